"""Regulariser registry (one module per regulariser in this folder, found automatically): loss terms that compose with any aligner that has trainable maps (e.g. STRUCTURE).

A regulariser is configured by name in `AlignerConfig.regularizers` (`{"structure": {"weight": 10.0, ...}}`);
`AlignerModel.from_encoders(..., structure_weight=10.0)` routes every `<name>_<field>` keyword to it. The model adds
each regulariser's (already weighted) term to the training loss under its name.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import nn

from ..methods.base import MethodConfig

REGULARIZERS: dict[str, type[Regularizer]] = {}


def register_regularizer(name: str):
    def decorator(cls: type[Regularizer]) -> type[Regularizer]:
        REGULARIZERS[name] = cls
        cls.regularizer_name = name
        return cls

    return decorator


class Regularizer(nn.Module, abc.ABC):
    """One loss term computed from the frozen features of a batch and their aligned embeddings."""

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    # which method inputs (`AlignerMethod.input_kind`) the term is defined for; checked when the model is built
    input_kinds: ClassVar[tuple[str, ...]] = ("pooled",)

    def __init__(self, config: MethodConfig):
        super().__init__()
        self.config = config

    @abc.abstractmethod
    def forward(
        self,
        vision_features: torch.Tensor,
        text_features: torch.Tensor,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """Return the weighted scalar term. Features are the tapped-layer inputs, embeddings the aligned outputs."""


def _registry() -> dict[str, type[Regularizer]]:
    # Regulariser modules register on import (their @register_regularizer decorator runs).
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return REGULARIZERS


def split_regularizer_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Separate `<regulariser>_<field>=value` keywords from the rest (which belong to the method)."""
    routed: dict[str, dict[str, Any]] = {}
    rest = {}
    names = sorted(_registry(), key=len, reverse=True)
    for key, value in kwargs.items():
        owner = next((n for n in names if key.startswith(n + "_")), None)
        if owner is None:
            rest[key] = value
        else:
            routed.setdefault(owner, {})[key[len(owner) + 1 :]] = value
    return routed, rest


def build_regularizers(settings: dict[str, dict[str, Any]]) -> nn.ModuleDict:
    registry = _registry()
    modules = nn.ModuleDict()
    for name, kwargs in settings.items():
        if name not in registry:
            raise ValueError(f"unknown regulariser {name!r}; available: {sorted(registry)}")
        cls = registry[name]
        modules[name] = cls(cls.config_class.from_kwargs(name, kwargs))
    return modules
