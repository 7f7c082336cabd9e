"""The similarity registry: name -> head class, filled by `@register_similarity` in each head's module, and the
configuration-time checks of a head choice (`check_similarity`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from ..utils.registry import Registry
from .base import SimilarityConfig

SIMILARITIES: Registry[type[nn.Module]] = Registry(
    "similarity", nn.Module, name_attribute="similarity_name", plural="similarities"
)


def register_similarity(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a head (an `nn.Module` subclass, normally of `SimilarityHead`) available as
    `similarity=name` (sets its `similarity_name`). A name already taken is a `ValueError` naming both classes."""
    return functools.partial(SIMILARITIES.register, name)


def get_similarity(name: str) -> type[nn.Module]:
    """The head class registered as `name`; `ValueError` listing the registered heads when there is none."""
    return SIMILARITIES.get(name)


def similarity_config_class(cls: type[nn.Module]) -> type[SimilarityConfig]:
    """The settings dataclass of a head class (`config_class`; a head without one takes no settings)."""
    return getattr(cls, "config_class", SimilarityConfig)


def build_similarity(name: str, dim: int, **kwargs) -> nn.Module:
    """Instantiate head `name` for embeddings of width `dim`; `kwargs` come from `AlignerConfig.similarity_config`
    (names, types, upper bounds and ranges checked by the head's `config_class.from_kwargs`)."""
    cls = get_similarity(name)
    similarity_config_class(cls).from_kwargs(name, kwargs)
    return cls(dim, **kwargs)


def check_similarity(name: str, method: Any = None, similarity_config: dict | None = None) -> type[nn.Module]:
    """Validate a head choice at configuration time: the name, its `similarity_config` (names, types, upper bounds
    and ranges: `config_class.from_kwargs`), and that `method` (an `AlignerMethod` class or instance, or `None` to
    skip) can use it: a learned head needs a trainable method (a training-free one never runs an optimiser step, so
    the head would stay untrained). Returns the head class.

    Raises `ValueError` (unknown name, bad value, incompatible method) or `TypeError` (unknown config key).
    """
    cls = get_similarity(name)
    similarity_config_class(cls).from_kwargs(name, dict(similarity_config or {}))
    if method is None:
        return cls
    if getattr(cls, "learned", False) and not getattr(method, "trainable", True):
        method_name = getattr(method, "method_name", getattr(method, "__name__", type(method).__name__))
        raise ValueError(
            f"similarity {name!r} has trainable parameters, but method {method_name!r} is training-free "
            "(trainable=False: training only runs its data-dependent initialisation), so the head would stay at its "
            "initial weights. Use a fixed similarity (e.g. cosine) with this method, or a trainable method."
        )
    return cls


__all__ = [
    "SIMILARITIES",
    "build_similarity",
    "check_similarity",
    "get_similarity",
    "register_similarity",
    "similarity_config_class",
]
