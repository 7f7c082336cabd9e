"""Method registry: name -> `AlignerMethod` subclass.

Adding a method = one module in this folder whose class carries `@register_method("<name>")`; every module here is
imported once, when the registry is first built, so nothing else needs editing.
"""

from __future__ import annotations

from typing import Any

from .base import AlignerMethod, MethodConfig

METHODS: dict[str, type[AlignerMethod]] = {}


def register_method(name: str):
    """Class decorator: make an `AlignerMethod` available as `method=name`."""

    def decorator(cls: type[AlignerMethod]) -> type[AlignerMethod]:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered to {METHODS[name].__name__}")
        METHODS[name] = cls
        cls.method_name = name
        return cls

    return decorator


def get_method(name: str) -> type[AlignerMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered methods: {sorted(METHODS)}") from None


def build_method_config(name: str, kwargs: dict[str, Any]) -> MethodConfig:
    cls = get_method(name)
    return cls.config_class.from_kwargs(name, kwargs)


def _register_builtin() -> None:
    # Importing a method module runs its @register_method decorator.
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_register_builtin()

__all__ = ["METHODS", "AlignerMethod", "MethodConfig", "build_method_config", "get_method", "register_method"]
