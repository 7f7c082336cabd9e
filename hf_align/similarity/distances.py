"""The distance heads `euclidean`, `manhattan` and `chi_square`: a negative distance, times `scale`. The last two
build a (Bi, Bt, D) intermediate and evaluate it in memory-bounded blocks (`max_chunk_elements`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..utils.checks import number, one_of, positive_int
from .base import (
    DEFAULT_MAX_CHUNK_ELEMENTS,
    SimilarityConfig,
    SimilarityHead,
    at_least_fp32,
    check_pairs,
    pairwise_chunked,
)
from .registry import register_similarity


@dataclass
class DistanceConfig(SimilarityConfig):
    """scale: factor of the negative distance (1: the raw metric)."""

    scale: float = number(1.0, low=0.0, low_inclusive=False, expected="a finite number > 0")


@dataclass
class EuclideanSimilarityConfig(DistanceConfig):
    """Settings of `euclidean`: `scale`."""


@dataclass
class ManhattanSimilarityConfig(DistanceConfig):
    """Settings of `manhattan`: `scale`; max_chunk_elements: numbers per block of the pairwise intermediate."""

    max_chunk_elements: int = positive_int(DEFAULT_MAX_CHUNK_ELEMENTS)


@dataclass
class ChiSquareSimilarityConfig(DistanceConfig):
    """Settings of `chi_square`: `scale`; signed: `"abs"` or `"softmax"` (see `ChiSquareSimilarity`);
    softmax_temperature: of the `"softmax"` reading; eps: added to each denominator; max_chunk_elements: numbers per
    block of the pairwise intermediate."""

    check_prefix = "chi_square "

    signed: str = one_of("abs", ("abs", "softmax"), expected="'abs' or 'softmax'")
    softmax_temperature: float = number(0.1, low=0.0, low_inclusive=False)
    eps: float = number(1e-8, low=0.0, low_inclusive=False)
    max_chunk_elements: int = positive_int(DEFAULT_MAX_CHUNK_ELEMENTS)


class _DistanceHead(SimilarityHead):
    """Negative distance, multiplied by `scale` (default 1: the raw metric)."""

    config_class = DistanceConfig

    def __init__(self, dim: int, **settings):
        super().__init__(dim, **settings)
        self.scale = float(self.config.scale)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}"


@register_similarity("euclidean")
class EuclideanSimilarity(_DistanceHead):
    """Negative Euclidean distance `−‖x − y‖₂` (in [−2, 0] on unit vectors).

    Computed as `√max(‖x‖² + ‖y‖² − 2 x·y, 1e-12)`: a matrix product, no (Bi, Bt, D) intermediate. The floor keeps
    the gradient finite for identical vectors (it shifts a zero distance to 1e-6).
    """

    config_class = EuclideanSimilarityConfig

    def forward(self, image_embeds, text_embeds):
        self._check(image_embeds, text_embeds)
        x, y = at_least_fp32(image_embeds), at_least_fp32(text_embeds)
        with torch.autocast(x.device.type, enabled=False):
            squared = (x * x).sum(-1)[:, None] + (y * y).sum(-1)[None, :] - 2.0 * (x @ y.t())
        return -self.scale * squared.clamp_min(1e-12).sqrt()

    def score_pairs(self, image_embeds, text_embeds):
        check_pairs(image_embeds, text_embeds)
        return -self.scale * ((image_embeds - text_embeds).pow(2).sum(-1).clamp_min(1e-12)).sqrt()


@register_similarity("manhattan")
class ManhattanSimilarity(_DistanceHead):
    """Negative Manhattan (L1) distance `−Σ_k |x_k − y_k|` (up to 2√D on unit vectors, so its logit range grows with
    D; `scale` rescales it). Evaluated in memory-bounded blocks (`max_chunk_elements`)."""

    config_class = ManhattanSimilarityConfig

    def __init__(self, dim: int, **settings):
        super().__init__(dim, **settings)
        self.max_chunk_elements = self.config.max_chunk_elements

    def forward(self, image_embeds, text_embeds):
        self._check(image_embeds, text_embeds)
        block = lambda x, y: (x[:, None, :] - y[None, :, :]).abs().sum(-1)  # noqa: E731
        x, y = at_least_fp32(image_embeds), at_least_fp32(text_embeds)
        return -self.scale * pairwise_chunked(block, x, y, 2 * self.dim, self.max_chunk_elements)

    def score_pairs(self, image_embeds, text_embeds):
        check_pairs(image_embeds, text_embeds)
        return -self.scale * (image_embeds - text_embeds).abs().sum(-1)


@register_similarity("chi_square")
class ChiSquareSimilarity(_DistanceHead):
    """Negative chi-square distance.

    The chi-square distance `½ Σ_k (x_k − y_k)² / (x_k + y_k)` is defined for non-negative histograms; aligned
    embeddings are signed. Two readings, chosen with `signed`:

    * `"abs"` (default): denominator `|x_k| + |y_k|`, i.e. `½ Σ_k (x_k − y_k)² / (|x_k| + |y_k|)`. It equals the
      classic chi-square distance on non-negative inputs, is symmetric, zero iff x = y, and each term is at most
      `|x_k − y_k|` (reached when the signs differ), so it sits between 0 and the L1 distance. Coordinates where both
      are 0 contribute 0 (the denominator gets `eps`).
    * `"softmax"`: map each embedding to a probability vector `softmax(x / softmax_temperature)` and take the classic
      chi-square between the two distributions (bounded by 1; insensitive to a constant shift of all coordinates).

    Evaluated in memory-bounded blocks (`max_chunk_elements`).
    """

    config_class = ChiSquareSimilarityConfig

    def __init__(self, dim: int, **settings):
        super().__init__(dim, **settings)
        self.signed = self.config.signed
        self.softmax_temperature = float(self.config.softmax_temperature)
        self.eps = float(self.config.eps)
        self.max_chunk_elements = self.config.max_chunk_elements

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x / self.softmax_temperature, dim=-1) if self.signed == "softmax" else x

    def _distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # broadcastable x, y (..., D) -> (...)
        return 0.5 * ((x - y).pow(2) / (x.abs() + y.abs() + self.eps)).sum(-1)

    def forward(self, image_embeds, text_embeds):
        self._check(image_embeds, text_embeds)
        x, y = self._prepare(at_least_fp32(image_embeds)), self._prepare(at_least_fp32(text_embeds))
        block = lambda a, b: self._distance(a[:, None, :], b[None, :, :])  # noqa: E731
        return -self.scale * pairwise_chunked(block, x, y, 4 * self.dim, self.max_chunk_elements)

    def score_pairs(self, image_embeds, text_embeds):
        check_pairs(image_embeds, text_embeds)
        return -self.scale * self._distance(self._prepare(image_embeds), self._prepare(text_embeds))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}, signed={self.signed!r}"


__all__ = [
    "ChiSquareSimilarity",
    "ChiSquareSimilarityConfig",
    "DistanceConfig",
    "EuclideanSimilarity",
    "EuclideanSimilarityConfig",
    "ManhattanSimilarity",
    "ManhattanSimilarityConfig",
]
