"""`asif`: training-free alignment through paired anchors (Norelli et al., "ASIF: coupled data turns unimodal models
to multimodal without training").

Anchors are `num_anchors` training pairs, picked in `init_from_data`. An image is described by its cosine to every
anchor image, a text by its cosine to every anchor caption; both vectors live in the same K-dim space. Each vector
keeps its `topk` largest entries, raised to the power `power`, the rest set to 0; the model L2-normalises it and
scores image–text pairs by cosine. This follows the authors' public notebook (top-k of the cosines, `values ** p`,
row normalisation, dot product), with one deviation: a kept cosine below 0 counts as 0 rather than being raised to an
even power (which would turn a dissimilar anchor into a similar one).

The anchors are buffers, so they are saved with `save_pretrained` and restored by `from_pretrained`; training only
runs `init_from_data`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..relative_representations import pick_anchor_pairs, relative_representation
from .base import AlignerMethod, MethodConfig
from .registry import register_method


@dataclass
class ASIFConfig(MethodConfig):
    """num_anchors: K training pairs used as anchors (the embedding width). topk: entries kept per relative vector
    (authors' default 800). power: exponent applied to the kept similarities (authors' default 8)."""

    num_anchors: int = 4096
    topk: int = 800
    power: float = 8.0

    def __post_init__(self):
        for name in ("num_anchors", "topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"asif: {name} must be a positive int, got {value!r}")
        if self.topk > self.num_anchors:
            raise ValueError(f"asif: topk={self.topk} must not exceed num_anchors={self.num_anchors}")
        if not isinstance(self.power, (int, float)) or not self.power > 0:
            raise ValueError(f"asif: power must be a number > 0, got {self.power!r}")


@register_method("asif")
class ASIFAligner(AlignerMethod):
    config_class = ASIFConfig
    trainable = False

    def __init__(self, config: ASIFConfig, vision_dim: int, text_dim: int):
        super().__init__(config, vision_dim, text_dim)
        self.embed_dim = config.num_anchors
        self.register_buffer("vision_anchors", torch.zeros(config.num_anchors, vision_dim))
        self.register_buffer("text_anchors", torch.zeros(config.num_anchors, text_dim))
        # 1 once init_from_data has run; saved with the anchors so a reloaded model knows it is ready.
        self.register_buffer("anchors_set", torch.zeros((), dtype=torch.uint8))

    @torch.no_grad()
    def init_from_data(self, vision_features, text_features, seed=0, vision_mask=None, text_mask=None) -> None:
        """Use `num_anchors` of the given (N, d) training pairs (drawn with `seed`) as the anchors."""
        self.set_anchors(*pick_anchor_pairs(vision_features, text_features, self.config.num_anchors, seed, "asif"))

    @torch.no_grad()
    def set_anchors(self, vision_anchors: torch.Tensor, text_anchors: torch.Tensor) -> None:
        """Use these (K, d_v) / (K, d_t) paired features as anchors (row k of each is one pair)."""
        expected = ((self.config.num_anchors, self.vision_dim), (self.config.num_anchors, self.text_dim))
        if (tuple(vision_anchors.shape), tuple(text_anchors.shape)) != expected:
            raise ValueError(
                f"asif anchors must have shapes {expected[0]} and {expected[1]}, got {tuple(vision_anchors.shape)} "
                f"and {tuple(text_anchors.shape)}"
            )
        self.vision_anchors.copy_(vision_anchors.to(self.vision_anchors))
        self.text_anchors.copy_(text_anchors.to(self.text_anchors))
        self.anchors_set.fill_(1)

    def _sparse_relative(self, features: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        if not bool(self.anchors_set):
            raise RuntimeError(
                "asif anchors are not set: run hf_align.train(model, features) (or model.aligner.init_from_data(...)) "
                "on training pairs before embedding"
            )
        similarities = relative_representation(features, anchors)
        values, index = similarities.topk(self.config.topk, dim=-1)
        values = values.clamp(min=0) ** self.config.power
        return torch.zeros_like(similarities).scatter_(-1, index, values)

    def embed_image(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._sparse_relative(features, self.vision_anchors)

    def embed_text(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._sparse_relative(features, self.text_anchors)

    def embed_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, P, d_v) patch tokens -> (B, P, K) per-patch relative vectors (segmentation)."""
        return self._sparse_relative(tokens, self.vision_anchors)
