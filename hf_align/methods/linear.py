"""`linear`: one linear map per modality into a shared `projection_dim` space, trained with CLIP's symmetric InfoNCE
(the baseline; `docs/methods.md` §2)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..utils.checks import positive_int
from .base import MethodConfig
from .citations import CLIP
from .projection import ProjectionPair
from .registry import register_method


@dataclass
class LinearConfig(MethodConfig):
    """projection_dim: width of the shared space. bias: add a bias to each map (the STRUCTURE authors' linear head has
    one; the default has none)."""

    projection_dim: int = positive_int(512)
    bias: bool = False


@register_method("linear")
class LinearAligner(ProjectionPair):
    config_class = LinearConfig
    citation = CLIP

    def make_head(self, in_dim: int) -> nn.Module:
        return nn.Linear(in_dim, self.config.projection_dim, bias=self.config.bias)
