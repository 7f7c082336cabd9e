"""Contrastive objectives shared by every aligner."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def symmetric_infonce(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP loss) for a batch of B matched pairs.

    Args:
        logits_per_image: (B, B) scores, row i = image i against every text, already divided by the temperature;
            the matching text of image i is text i.

    Returns:
        `½ [CE(S, arange B) + CE(Sᵀ, arange B)]`, computed in fp32 so bf16 training with small τ stays finite.
    """
    if logits_per_image.dim() != 2 or logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise ValueError(
            f"symmetric InfoNCE needs a square (B, B) score matrix of matched pairs, got {tuple(logits_per_image.shape)}"
        )
    logits = logits_per_image.float()
    targets = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
