"""The method registry: name -> `AlignerMethod` subclass, filled by `@register_method` in each method's module."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ..utils.registry import Registry
from .base import AlignerMethod, MethodConfig

METHODS: Registry[type[AlignerMethod]] = Registry("method", AlignerMethod, name_attribute="method_name")


def register_method(name: str) -> Callable[[type[AlignerMethod]], type[AlignerMethod]]:
    """Class decorator: make an `AlignerMethod` subclass available as `method=name` (sets its `method_name`).
    A name already taken is a `ValueError` naming both classes."""
    return functools.partial(METHODS.register, name)


def get_method(name: str) -> type[AlignerMethod]:
    """The method class registered as `name`; `ValueError` listing the registered methods when there is none."""
    return METHODS.get(name)


def build_method_config(name: str, kwargs: dict[str, Any]) -> MethodConfig:
    """Method `name`'s settings dataclass from keyword settings (names, types and ranges checked)."""
    return get_method(name).config_class.from_kwargs(name, kwargs)


__all__ = ["METHODS", "build_method_config", "get_method", "register_method"]
