"""Deprecated alias of `hf_align.experiments.data_efficiency` (experiments live apart from the library since 0.2)."""

import sys
import warnings

from .experiments import data_efficiency

warnings.warn(
    f"hf_align.data_efficiency is deprecated and will be removed in 0.3; import {data_efficiency.__name__} instead",
    FutureWarning,
    stacklevel=2,
)
sys.modules[__name__] = data_efficiency
