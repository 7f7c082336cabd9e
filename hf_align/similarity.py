"""Similarity heads: how an aligned image embedding and an aligned text embedding are scored.

Registry by name, like the methods. Inputs are the model's L2-normalised embeddings (Bi, D) and (Bt, D); output is
(Bi, Bt) raw similarity, divided by the temperature by the model to give logits.
"""

from __future__ import annotations

import torch
from torch import nn

SIMILARITIES: dict[str, type[nn.Module]] = {}


def register_similarity(name: str):
    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        SIMILARITIES[name] = cls
        cls.similarity_name = name
        return cls

    return decorator


def build_similarity(name: str, dim: int, **kwargs) -> nn.Module:
    """Instantiate head `name` for embeddings of width `dim`; `kwargs` come from `AlignerConfig.similarity_config`."""
    try:
        cls = SIMILARITIES[name]
    except KeyError:
        raise ValueError(f"unknown similarity {name!r}; available: {sorted(SIMILARITIES)}") from None
    return cls(dim, **kwargs)


@register_similarity("cosine")
class CosineSimilarity(nn.Module):
    """Cosine similarity; embeddings arrive normalised, so this is their dot product."""

    def __init__(self, dim: int):
        super().__init__()

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return image_embeds @ text_embeds.t()
