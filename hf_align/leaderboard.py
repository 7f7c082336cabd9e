"""Deprecated alias of `hf_align.experiments.compare` (experiments live apart from the library since 0.2)."""

import sys
import warnings

from .experiments import compare

warnings.warn(
    f"hf_align.leaderboard is deprecated and will be removed in 0.3; import {compare.__name__} instead",
    FutureWarning,
    stacklevel=2,
)
sys.modules[__name__] = compare
