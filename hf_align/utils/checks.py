"""Checks of settings, declared once: upper bounds of int settings by name, positive ints, bounded numbers, and the
type check of a settings dataclass's fields. Methods, regularisers, similarity heads, `AlignerConfig` and
`AlignmentArguments` use them, so an error names the field the same way everywhere."""

from __future__ import annotations

import math
import typing
from typing import Any

# Upper bounds of integer settings, by name, declared once for every component that has them (methods,
# regularisers, similarity heads: `check_upper_bounds`, run by `check_settings`) and for `AlignerConfig`'s widths. A
# config.json or recipe asking for more is refused by name before anything is built: widths and counts size tensors
# (a 65 536-wide projection of a 65 536-wide feature is already 16 GiB in fp32), iteration counts size run time.
MAX_WIDTH = 2**16  # feature, projection and hidden widths, codebook sizes (the widest encoders are 16 384 wide)
MAX_ANCHORS = 2**21  # anchor pairs and queue rows (ASIF's authors use 1.6 M anchors)
MAX_STEPS = 2**31 - 1  # step counts (int32, what a checkpoint's trainer state holds)
SETTING_BOUNDS: dict[str, int] = {
    "vision_hidden_size": MAX_WIDTH,
    "text_hidden_size": MAX_WIDTH,
    "vision_num_layers": 4096,
    "text_num_layers": 4096,
    "vision_num_prefix_tokens": 4096,
    "projection_dim": MAX_WIDTH,
    "hidden_dim": MAX_WIDTH,
    "projector_dim": MAX_WIDTH,  # token_relative's bottleneck projector (PAL's ablation uses 512)
    "width_factor": 64,  # SAIL's StarMLP hidden width = width_factor x input width (the authors use 8)
    "num_codes": MAX_WIDTH,
    "num_anchors": MAX_ANCHORS,
    "topk": MAX_ANCHORS,
    "queue_length": MAX_ANCHORS,
    "num_hidden_layers": 64,
    "levels": 16,  # STRUCTURE's hierarchy levels / powers (the authors use up to 5)
    "refine_levels": 16,  # the same, for csa's STRUCTURE refinement of its fit
    "refine_epochs": 10_000,
    "refine_batch_size": MAX_ANCHORS,
    "num_heads": 4096,  # attention heads (attention_pool)
    "sinkhorn_iters": 10_000,
    "kmeans_iters": 10_000,
    "usage_window": MAX_STEPS,
    "queue_start_steps": MAX_STEPS,
    "freeze_codebook_steps": MAX_STEPS,
    "warmup_steps": MAX_STEPS,
    "max_chunk_elements": 2**31,  # elements of one block of a pairwise intermediate (8 GiB in fp32)
}


def check_upper_bounds(owner: str, values: dict[str, Any]) -> None:
    """Refuse an int setting (or an int in a list setting, e.g. STRUCTURE's `levels`) above its `SETTING_BOUNDS`
    entry, naming `owner` and the field. Other types are left to the type checks (`check_settings`, the dataclass)."""
    for name, value in values.items():
        bound = SETTING_BOUNDS.get(name)
        items = value if isinstance(value, (list, tuple)) else [value]
        ints = [v for v in items if isinstance(v, int) and not isinstance(v, bool)]
        if bound is not None and any(v > bound for v in ints):
            raise ValueError(
                f"{owner} setting {name}={value!r} is above its upper bound {bound:,} (hf_align.utils.checks."
                "SETTING_BOUNDS): a config asking for more is refused before anything is built"
            )


def check_positive_int(name: str, value: Any, expected: str = "a positive int") -> int:
    """`value` must be an int >= 1 (bools, floats and strings refused: YAML and JSON turn typos into those)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """`value` must be a finite int/float within [low, high] (bounds optional, each inclusive or not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        bounds = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"{name} must be in {bounds}, got {value!r}")
    return value


def check_settings(owner: str, settings_class: type, values: dict[str, Any]) -> None:
    """Type-check keyword settings of a method's or regulariser's settings dataclass against its field annotations.

    Fields annotated `int`, `float`, `bool` or `str` must hold exactly that (a bool is not an int, a float must be
    finite, an int is a float); other annotations and unknown names are left to the dataclass (`from_kwargs` lists
    the names it accepts). Run before the dataclass is built, whose own range checks may assume the types: a recipe
    or config.json with `projection_dim: "512"` or `bias: "no"` then fails by name when the aligner is built. Int
    settings are also held to their upper bounds (`check_upper_bounds`).
    """
    kinds = {int: "an int", float: "a finite number", bool: "True or False", str: "a string"}
    check_upper_bounds(repr(owner), values)
    hints = typing.get_type_hints(settings_class)
    for name, value in values.items():
        kind = hints.get(name)
        if kind not in kinds:
            continue
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is str:
            ok = isinstance(value, str)
        else:
            ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
            ok = ok and (kind is int or math.isfinite(value))
        if not ok:
            raise ValueError(f"{owner!r} setting {name} must be {kinds[kind]}, got {value!r}")
