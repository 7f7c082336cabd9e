"""Deprecated alias of `hf_align.relative_representations` (renamed so that it is not mistaken for the `relative`
method, `hf_align.methods.relative`)."""

import sys
import warnings

from . import relative_representations

warnings.warn(
    "hf_align.relative is deprecated and will be removed in 0.3; import hf_align.relative_representations instead",
    FutureWarning,
    stacklevel=2,
)
sys.modules[__name__] = relative_representations
