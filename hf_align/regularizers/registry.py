"""The regulariser registry: name -> `Regularizer` subclass, filled by `@register_regularizer` in each module, and how
`AlignerModel.from_encoders` keywords reach it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from typing import Any

from torch import nn

from ..utils.registry import Registry
from .base import Regularizer

REGULARIZERS: Registry[type[Regularizer]] = Registry("regulariser", Regularizer, name_attribute="regularizer_name")


def register_regularizer(name: str) -> Callable[[type[Regularizer]], type[Regularizer]]:
    """Class decorator: make a `Regularizer` subclass available as `regularizers={name: {...}}` and `<name>_<field>=`
    keywords (sets its `regularizer_name`). A name already taken is a `ValueError` naming both classes."""
    return functools.partial(REGULARIZERS.register, name)


def get_regularizer(name: str) -> type[Regularizer]:
    """The regulariser class registered as `name`; `ValueError` listing the registered ones when there is none."""
    return REGULARIZERS.get(name)


def split_regularizer_kwargs(
    kwargs: dict[str, Any],
    regularizers: dict[str, dict[str, Any]] | None = None,
    reserved: Collection[str] = (),
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Route `<regulariser>_<field>=value` keywords (e.g. `structure_weight=10`) into per-regulariser settings.

    A keyword in `reserved` (the method's own fields) is never routed: a regulariser named `num` does not capture the
    method's `num_anchors`. Any other keyword prefixed by a regulariser's name is that regulariser's, whose settings
    dataclass then refuses a field it does not have, by name.

    Args:
        kwargs: keywords of `from_encoders`; those not routed are returned for the method.
        regularizers: the explicit mapping `{"structure": {"weight": 10.0}}`, merged with the routed keywords.
        reserved: keyword names that belong to the method whatever their prefix.

    Returns:
        (settings by regulariser name, the remaining keywords). Giving one field both ways is a `ValueError` naming
        both spellings; a non-dict mapping or entry is a `ValueError` too.
    """
    if regularizers is None:
        regularizers = {}
    if not isinstance(regularizers, dict) or not all(isinstance(v, dict) for v in regularizers.values()):
        raise ValueError(
            "regularizers must map regulariser names to dicts of their settings, e.g. {'structure': {'weight': 10.0}}, "
            f"got {regularizers!r}"
        )
    routed = {name: dict(values) for name, values in regularizers.items()}
    names = sorted(REGULARIZERS, key=len, reverse=True)  # longest first: a name may prefix another
    rest = {}
    for key, value in kwargs.items():
        owner = next((n for n in names if key.startswith(n + "_")), None)
        if owner is None or key in reserved:
            rest[key] = value
            continue
        field = key[len(owner) + 1 :]
        settings = routed.setdefault(owner, {})
        if field in settings:
            raise ValueError(
                f"{key}={value!r} and regularizers[{owner!r}][{field!r}]={settings[field]!r} both set setting "
                f"{field!r} of regulariser {owner!r}: give it one way only"
            )
        settings[field] = value
    return routed, rest


def build_regularizers(settings: dict[str, dict[str, Any]]) -> nn.ModuleDict:
    """One module per entry of `settings` (name -> keyword settings, names, types and ranges checked)."""
    modules = nn.ModuleDict()
    for name, kwargs in settings.items():
        cls = get_regularizer(name)
        modules[name] = cls(cls.config_class.from_kwargs(name, kwargs))
    return modules


__all__ = ["REGULARIZERS", "build_regularizers", "get_regularizer", "register_regularizer", "split_regularizer_kwargs"]
