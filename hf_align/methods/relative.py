"""`relative`: global relative representations with learnable paired anchors (`docs/methods.md` §5.2).

An image is described by its similarities to K vision anchors `A_v` (K, d_v), a text by its similarities to K text
anchors `A_t` (K, d_t): `r_v(x) = softmax(cos(x, A_v) / τ_r)` (or the plain cosines, `relative_mode="cosine"`).
Image–text similarity is the cosine of the two relative vectors, trained with the model's InfoNCE. Only the anchors
(and τ_r) train: there is no projection layer. The anchors start as K training pairs (`init_from_data`, our choice);
a model that never saw data starts from random anchors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..functional.relative_representations import pick_anchor_pairs, relative_representation
from ..utils.checks import number, one_of, positive_int
from .base import AlignerMethod, MethodConfig
from .citations import PAL, RELATIVE_REPRESENTATIONS, join
from .registry import register_method

RELATIVE_MODES = ("softmax", "cosine")


@dataclass
class RelativeConfig(MethodConfig):
    """num_anchors: K paired anchors (the embedding width). relative_mode: `softmax` (over anchors, temperature
    `anchor_temperature`) or `cosine` (plain cosines). learn_anchor_temperature: train τ_r (softmax mode only)."""

    check_prefix = "relative: "

    num_anchors: int = positive_int(512)
    relative_mode: str = one_of("softmax", RELATIVE_MODES)
    anchor_temperature: float = number(0.1, low=0.0, low_inclusive=False, expected="a finite number > 0")
    learn_anchor_temperature: bool = True


@register_method("relative")
class RelativeAligner(AlignerMethod):
    config_class = RelativeConfig
    citation = join(RELATIVE_REPRESENTATIONS, PAL)

    def __init__(self, config: RelativeConfig, vision_dim: int, text_dim: int):
        super().__init__(config, vision_dim, text_dim)
        self.embed_dim = config.num_anchors
        self.vision_anchors = nn.Parameter(torch.empty(config.num_anchors, vision_dim))
        self.text_anchors = nn.Parameter(torch.empty(config.num_anchors, text_dim))
        learn = config.learn_anchor_temperature and config.relative_mode == "softmax"
        self.log_anchor_temperature = nn.Parameter(torch.empty(()), requires_grad=learn)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.init functions leave parameters loaded from a checkpoint alone (transformers guards them).
        nn.init.normal_(self.vision_anchors)
        nn.init.normal_(self.text_anchors)
        nn.init.constant_(self.log_anchor_temperature, math.log(self.config.anchor_temperature))

    @torch.no_grad()
    def init_from_data(self, vision_features, text_features, seed=0, vision_mask=None, text_mask=None) -> None:
        """Start the anchors at `num_anchors` of the given (N, d) training pairs, drawn with `seed`."""
        vision, text = pick_anchor_pairs(vision_features, text_features, self.config.num_anchors, seed, "relative")
        self.vision_anchors.copy_(vision.to(self.vision_anchors))
        self.text_anchors.copy_(text.to(self.text_anchors))

    @property
    def anchor_temperature(self) -> torch.Tensor:
        return self.log_anchor_temperature.exp()

    def relative(self, features: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """(..., d) features -> (..., K) relative vectors (softmax or plain cosines, per `relative_mode`)."""
        similarities = relative_representation(features, anchors)
        if self.config.relative_mode == "softmax":
            return torch.softmax(similarities / self.anchor_temperature, dim=-1)
        return similarities

    def embed_image(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.relative(features, self.vision_anchors)

    def embed_text(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.relative(features, self.text_anchors)

    def embed_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, P, d_v) patch tokens -> (B, P, K) per-patch relative vectors (segmentation)."""
        return self.relative(tokens, self.vision_anchors)

    def diagnostics(self) -> dict[str, float]:
        return {"anchor_temperature": float(self.anchor_temperature.detach())}
