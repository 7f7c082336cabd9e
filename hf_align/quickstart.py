"""Deprecated alias of `hf_align.experiments.quickstart` (experiments live apart from the library since 0.2)."""

import sys
import warnings

from .experiments import quickstart

warnings.warn(
    f"hf_align.quickstart is deprecated and will be removed in 0.3; import {quickstart.__name__} instead",
    FutureWarning,
    stacklevel=2,
)
sys.modules[__name__] = quickstart
