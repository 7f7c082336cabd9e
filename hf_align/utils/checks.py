"""Checks of settings, declared once: upper bounds of int settings by name, positive ints, bounded numbers, and the
type check of a settings dataclass's fields. Methods, regularisers, similarity heads, `AlignerConfig` and
`AlignmentArguments` use them, so an error names the field the same way everywhere.

A settings dataclass declares the check of a field with its default (`positive_int(512)`, `number(0.1, low=0.0)`,
`one_of("cap", POOLINGS)`, ...) and `check_fields(config)` runs every declared check (`ComponentConfig.__post_init__`
does, for methods, regularisers and similarity heads); a `__post_init__` is left for what relates fields.
"""

from __future__ import annotations

import dataclasses
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


def check_settings(owner: str, settings_class: type, values: dict[str, Any], label: str | None = None) -> None:
    """Type-check keyword settings of a method's or regulariser's settings dataclass against its field annotations.

    Fields annotated `int`, `float`, `bool` or `str` must hold exactly that (a bool is not an int, a float must be
    finite, an int is a float); other annotations and unknown names are left to the dataclass (`from_kwargs` lists
    the names it accepts). Run before the dataclass is built, whose own range checks may assume the types: a recipe
    or config.json with `projection_dim: "512"` or `bias: "no"` then fails by name when the aligner is built. Int
    settings are also held to their upper bounds (`check_upper_bounds`). `label` is how messages name the owner:
    `repr(owner)` by default (`'linear'`); the similarity heads say `similarity 'mlp'`.
    """
    kinds = {int: "an int", float: "a finite number", bool: "True or False", str: "a string"}
    label = repr(owner) if label is None else label
    check_upper_bounds(label, values)
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
            raise ValueError(f"{label} setting {name} must be {kinds[kind]}, got {value!r}")


# ---------------------------------------------------------------------------------------------- declared fields
CHECK_METADATA = "hf_align.check"  # the key of a field's declared check in `dataclasses.Field.metadata`


def _special(value: Any, also: tuple) -> bool:
    """Whether `value` is one of the non-numeric values a field also accepts (`"auto"`, `None`), by type and value
    (so `1 == True` or a list never matches by accident)."""
    return any(type(value) is type(a) and value == a for a in also)


def _or_also(expected: str, also: tuple) -> str:
    return " or ".join([expected, *(repr(a) for a in also)])


@dataclasses.dataclass(frozen=True)
class FieldCheck:
    """The declared check of one settings field: `check(name, value)` raises `ValueError` naming the field.

    kind: `"positive_int"` (an int >= 1), `"nonnegative_int"` (an int >= 0), `"number"` (a finite int/float within
    `low`/`high`), `"one_of"` (a member of `options`) or `"flag"` (a bool). `also`: values accepted besides (`"auto"`).
    `expected`: the phrase of the message `"{name} must be {expected}, got {value!r}"`; by default the kind's own
    (a `number` out of range without one names its interval, as `check_number` does).
    """

    kind: str
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    options: tuple = ()
    also: tuple = ()
    expected: str | None = None

    def check(self, name: str, value: Any) -> None:
        if _special(value, self.also):
            return
        if self.kind in ("positive_int", "nonnegative_int"):
            low = 1 if self.kind == "positive_int" else 0
            default = "a positive int" if low else "an int >= 0"
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be {self.expected or _or_also(default, self.also)}, got {value!r}")
        elif self.kind == "number":
            if self.expected is None:
                check_number(name, value, self.low, self.high, self.low_inclusive, self.high_inclusive)
                return
            try:
                check_number(name, value, self.low, self.high, self.low_inclusive, self.high_inclusive)
            except ValueError:
                raise ValueError(f"{name} must be {self.expected}, got {value!r}") from None
        elif self.kind == "one_of":
            if not any(type(value) is type(o) and value == o for o in self.options):
                raise ValueError(f"{name} must be {self.expected or f'one of {self.options}'}, got {value!r}")
        elif self.kind == "flag":
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be {self.expected or 'True or False'}, got {value!r}")
        else:
            raise ValueError(f"unknown field check kind {self.kind!r}")


def _declared(default: Any, check: FieldCheck) -> Any:
    return dataclasses.field(default=default, metadata={CHECK_METADATA: check})


def positive_int(default: Any, *, also: tuple = (), expected: str | None = None) -> Any:
    """A dataclass field holding an int >= 1 (bools refused), or one of `also` (e.g. `("auto",)`)."""
    return _declared(default, FieldCheck("positive_int", also=tuple(also), expected=expected))


def nonnegative_int(default: Any, *, also: tuple = (), expected: str | None = None) -> Any:
    """A dataclass field holding an int >= 0 (bools refused), or one of `also`."""
    return _declared(default, FieldCheck("nonnegative_int", also=tuple(also), expected=expected))


def number(
    default: Any,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    *,
    also: tuple = (),
    expected: str | None = None,
) -> Any:
    """A dataclass field holding a finite int/float within [low, high] (each bound optional, inclusive or not; bools,
    NaN and infinities refused), or one of `also`. The message is `check_number`'s unless `expected` is given."""
    check = FieldCheck("number", low, high, low_inclusive, high_inclusive, also=tuple(also), expected=expected)
    return _declared(default, check)


def one_of(default: Any, options: tuple, *, expected: str | None = None) -> Any:
    """A dataclass field holding one of `options` (compared by type and value)."""
    return _declared(default, FieldCheck("one_of", options=tuple(options), expected=expected))


def flag(default: bool, *, expected: str | None = None) -> Any:
    """A dataclass field holding True or False (not 1, not "yes")."""
    return _declared(default, FieldCheck("flag", expected=expected))


def declared_check(field: dataclasses.Field) -> FieldCheck | None:
    """The check a field declares (`positive_int`, `number`, ...), or None."""
    return field.metadata.get(CHECK_METADATA)


def check_fields(config: Any, prefix: str = "") -> None:
    """Run the declared check of every field of the dataclass instance `config`, in field order; messages name the
    field as `prefix + name` (e.g. `"asif: num_anchors must be a positive int or 'auto', got 0"`)."""
    for field in dataclasses.fields(config):
        check = declared_check(field)
        if check is not None:
            check.check(prefix + field.name, getattr(config, field.name))
