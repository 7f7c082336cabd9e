"""The inner-product heads `cosine` and `dot`: the score matrix is a matrix product (`inner_product = True`), and
they take no settings."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import SimilarityConfig, SimilarityHead, check_pairs
from .registry import register_similarity


@dataclass
class CosineSimilarityConfig(SimilarityConfig):
    """`cosine` takes no settings."""


@dataclass
class DotProductSimilarityConfig(SimilarityConfig):
    """`dot` takes no settings."""


@register_similarity("cosine")
class CosineSimilarity(SimilarityHead):
    """Cosine similarity `x·y / (‖x‖‖y‖)`, in [−1, 1]. The model's embeddings arrive normalised, so this is their
    dot product; rows are renormalised anyway so the head is a true cosine on any input."""

    config_class = CosineSimilarityConfig
    inner_product = True

    def forward(self, image_embeds, text_embeds):
        self._check(image_embeds, text_embeds)
        return F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).t()

    def score_unit_norm(self, image_embeds, text_embeds):
        # Unit-norm rows: the cosine is their dot product; renormalising would cost 2 normalisations and their backward.
        self._check(image_embeds, text_embeds)
        return image_embeds @ text_embeds.t()

    def score_pairs(self, image_embeds, text_embeds):
        check_pairs(image_embeds, text_embeds)
        return F.cosine_similarity(image_embeds, text_embeds, dim=-1)


@register_similarity("dot")
class DotProductSimilarity(SimilarityHead):
    """Dot product `x·y` (no normalisation; equal to `cosine` on the model's unit-norm embeddings)."""

    config_class = DotProductSimilarityConfig
    inner_product = True

    def forward(self, image_embeds, text_embeds):
        self._check(image_embeds, text_embeds)
        return image_embeds @ text_embeds.t()

    def score_pairs(self, image_embeds, text_embeds):
        check_pairs(image_embeds, text_embeds)
        return (image_embeds * text_embeds).sum(-1)


__all__ = ["CosineSimilarity", "CosineSimilarityConfig", "DotProductSimilarity", "DotProductSimilarityConfig"]
