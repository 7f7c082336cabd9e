"""Deprecated alias of `hf_align.representation_similarity` (renamed to say what it holds: mutual k-NN and CKA, the
cross-modal similarity of two representations of the same samples)."""

import sys
import warnings

from . import representation_similarity

warnings.warn(
    "hf_align.representation is deprecated and will be removed in 0.3; import hf_align.representation_similarity "
    "instead",
    FutureWarning,
    stacklevel=2,
)
sys.modules[__name__] = representation_similarity
