"""Regularisers: loss terms that compose with any aligner that has trainable maps (e.g. STRUCTURE), one module each,
registered by name in `REGULARIZERS`.

A regulariser is configured by name in `AlignerConfig.regularizers` (`{"structure": {"weight": 10.0, ...}}`):
`AlignerModel.from_encoders(..., regularizers={"structure": {"weight": 10.0}})`, or the shorthand
`structure_weight=10.0` that routes every `<name>_<field>` keyword to it. The model adds each regulariser's (already
weighted) term to the training loss under its name. Adding one = a module here whose class carries
`@register_regularizer("<name>")` (from `.registry`), plus its import below.
"""

# The built-in regularisers: importing a module runs its @register_regularizer. (`as`: re-exported, not unused.)
from . import structure as structure
from .base import Regularizer, RegularizerConfig
from .registry import (
    REGULARIZERS,
    build_regularizers,
    get_regularizer,
    register_regularizer,
    split_regularizer_kwargs,
)

__all__ = [
    "REGULARIZERS",
    "Regularizer",
    "RegularizerConfig",
    "build_regularizers",
    "get_regularizer",
    "register_regularizer",
    "split_regularizer_kwargs",
]
