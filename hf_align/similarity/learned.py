"""The learned heads `mlp` and `bilinear`: trainable parameters that train with the aligner and are saved with it
(`learned = True`; `check_similarity` refuses them with a training-free method)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.checks import number, one_of, positive_int
from .base import DEFAULT_MAX_CHUNK_ELEMENTS, SimilarityConfig, SimilarityHead, check_pairs, pairwise_chunked
from .registry import register_similarity


@dataclass
class MLPSimilarityConfig(SimilarityConfig):
    """Settings of `mlp`. hidden_dim: width of the hidden layers. num_hidden_layers: hidden layers (≥ 1). dropout:
    after each GELU. interaction: add the `C (x ⊙ y)` term to the first layer. max_chunk_elements: activations per
    block of the pairwise evaluation."""

    check_prefix = "mlp "

    hidden_dim: int = positive_int(256)
    num_hidden_layers: int = positive_int(1, expected="an int >= 1")
    dropout: float = number(0.0, low=0.0, high=1.0, high_inclusive=False)
    interaction: bool = False
    max_chunk_elements: int = positive_int(DEFAULT_MAX_CHUNK_ELEMENTS)


@dataclass
class BilinearSimilarityConfig(SimilarityConfig):
    """Settings of `bilinear`. init: `"identity"` (Δ = 0, the head starts as the dot product) or `"random"` (Δ drawn
    with std `init_std`)."""

    check_prefix = "bilinear "

    init: str = one_of("identity", ("identity", "random"), expected="'identity' or 'random'")
    init_std: float = number(0.02, low=0.0)


@register_similarity("mlp")
class MLPSimilarity(SimilarityHead):
    """Learned scorer: an MLP on the concatenated pair, `s(x, y) = w_outᵀ φ(… φ(A x + B y + b₁) …) + b_out`.

    `A x + B y` is the first linear layer applied to `[x; y]`, split so that the (Bi, Bt, hidden_dim) first-layer
    activations are a broadcast sum of two small products. `interaction=True` adds a term `C (x ⊙ y)` to the first
    layer (element-wise products, which an MLP on `[x; y]` can only approximate; it costs Bi·Bt·hidden_dim·D
    multiply-adds). `num_hidden_layers` ≥ 1 hidden layers of width `hidden_dim`, GELU, optional dropout. The output
    layer starts at zero (all pairs score 0, InfoNCE at log B) so the head learns its scale from the data.

    Cost: O(Bi·Bt·hidden_dim) memory per forward, evaluated in blocks of at most `max_chunk_elements` activations and
    recomputed blockwise in the backward pass.
    """

    config_class = MLPSimilarityConfig
    learned = True

    def __init__(self, dim: int, **settings):
        super().__init__(dim, **settings)
        config = self.config
        hidden_dim = config.hidden_dim
        self.hidden_dim = hidden_dim
        self.interaction = bool(config.interaction)
        self.max_chunk_elements = config.max_chunk_elements
        self.image_in = nn.Linear(dim, hidden_dim)
        self.text_in = nn.Linear(dim, hidden_dim, bias=False)
        self.product_in = nn.Linear(dim, hidden_dim, bias=False) if self.interaction else None
        self.hidden = nn.ModuleList(nn.Linear(hidden_dim, hidden_dim) for _ in range(config.num_hidden_layers - 1))
        self.dropout = nn.Dropout(config.dropout)
        self.out_weight = nn.Parameter(torch.zeros(hidden_dim))
        self.out_bias = nn.Parameter(torch.zeros(()))

    def reset_parameters(self) -> None:
        # Only the parameters held directly here; the nn.Linear children reset themselves.
        nn.init.zeros_(self.out_weight)
        nn.init.zeros_(self.out_bias)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.dropout(F.gelu(h))
        for layer in self.hidden:
            h = self.dropout(F.gelu(layer(h)))
        return h @ self.out_weight.to(h.dtype) + self.out_bias.to(h.dtype)

    def _block(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.image_in(x)[:, None, :] + self.text_in(y)[None, :, :]  # (bi, bt, H)
        if self.product_in is not None:
            # Σ_d C[h, d] x_d y_d for every pair, as a batched matmul: (bi, H, D) @ (D, bt) -> (bi, H, bt)
            h = h + ((x[:, None, :] * self.product_in.weight[None]) @ y.t()).permute(0, 2, 1)
        return self._head(h)

    def forward(self, image_embeds, text_embeds):
        self._check(image_embeds, text_embeds)
        width = self.hidden_dim * (2 + 2 * len(self.hidden))
        return pairwise_chunked(self._block, image_embeds, text_embeds, width, self.max_chunk_elements, module=self)

    def score_pairs(self, image_embeds, text_embeds):
        check_pairs(image_embeds, text_embeds)
        h = self.image_in(image_embeds) + self.text_in(text_embeds)
        if self.product_in is not None:
            h = h + self.product_in(image_embeds * text_embeds)
        return self._head(h)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden_dim={self.hidden_dim}, interaction={self.interaction}"


@register_similarity("bilinear")
class BilinearSimilarity(SimilarityHead):
    """Learned bilinear form `s(x, y) = xᵀ W y` with `W = I + Δ`.

    Δ (D×D) starts at zero (`init="identity"`, the head then begins as the dot product = cosine on unit vectors) or
    small random (`init="random"`, std `init_std`). Cost: one extra (Bi, D) × (D, D) product, no pairwise
    intermediate, so it is as cheap as cosine.
    """

    config_class = BilinearSimilarityConfig
    learned = True

    def __init__(self, dim: int, **settings):
        super().__init__(dim, **settings)
        self.init = self.config.init
        self.init_std = float(self.config.init_std)
        self.delta = nn.Parameter(torch.zeros(dim, dim))

    def reset_parameters(self) -> None:
        if self.init == "identity":
            nn.init.zeros_(self.delta)
        else:
            nn.init.normal_(self.delta, std=self.init_std)

    @property
    def weight(self) -> torch.Tensor:
        """W = I + Δ, the matrix of the bilinear form."""
        return self.delta + torch.eye(self.dim, dtype=self.delta.dtype, device=self.delta.device)

    def forward(self, image_embeds, text_embeds):
        self._check(image_embeds, text_embeds)
        x = image_embeds + image_embeds @ self.delta.to(image_embeds.dtype)
        return x @ text_embeds.t()

    def score_pairs(self, image_embeds, text_embeds):
        check_pairs(image_embeds, text_embeds)
        return ((image_embeds + image_embeds @ self.delta.to(image_embeds.dtype)) * text_embeds).sum(-1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, init={self.init!r}"


__all__ = ["BilinearSimilarity", "BilinearSimilarityConfig", "MLPSimilarity", "MLPSimilarityConfig"]
