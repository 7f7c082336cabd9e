"""Shared body of the projection aligners: one head per modality mapping pooled features to `projection_dim`."""

from __future__ import annotations

import abc

import torch
from torch import nn

from .base import AlignerMethod, MethodConfig


class ProjectionPair(AlignerMethod):
    """`f(x) = head_v(x)`, `g(y) = head_t(y)`; subclasses say what a head is."""

    def __init__(self, config: MethodConfig, vision_dim: int, text_dim: int):
        super().__init__(config, vision_dim, text_dim)
        self.embed_dim = config.projection_dim
        self.vision_head = self.make_head(vision_dim)
        self.text_head = self.make_head(text_dim)

    @abc.abstractmethod
    def make_head(self, in_dim: int) -> nn.Module:
        """The module mapping (B, in_dim) features to (B, projection_dim)."""

    def embed_image(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.vision_head(features)

    def embed_text(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.text_head(features)
