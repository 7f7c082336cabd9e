"""Contrastive objectives shared by every aligner (docs/methods.md §1), and the same-image mask they and the
regularisers use when a batch holds several captions of one image."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def same_image_mask(image_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Which pairs (i, j), i ≠ j, of a batch show the same image: those are not negatives of each other.

    Args:
        image_ids: (B,) integer id of the image of each row (rows with equal ids are captions of one image).
        batch_size: B, the number of rows the mask must cover (checked against `image_ids`).

    Returns:
        (B, B) bool, True where `image_ids[i] == image_ids[j]` and `i != j`; the diagonal (each pair's own match) is
        always False.
    """
    if not isinstance(image_ids, torch.Tensor) or image_ids.shape != (batch_size,):
        shape = tuple(image_ids.shape) if isinstance(image_ids, torch.Tensor) else type(image_ids).__name__
        raise ValueError(f"image_ids must be a ({batch_size},) tensor, one image id per pair of the batch, got {shape}")
    if image_ids.is_floating_point() or image_ids.is_complex() or image_ids.dtype == torch.bool:
        raise ValueError(f"image_ids must hold integer ids, got dtype {image_ids.dtype}")
    same = image_ids[:, None] == image_ids[None, :]
    return same.fill_diagonal_(False)


def symmetric_infonce(logits_per_image: torch.Tensor, image_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP loss) for a batch of B matched pairs.

    Args:
        logits_per_image: (B, B) scores, row i = image i against every text, already divided by the temperature;
            the matching text of image i is text i.
        image_ids: optional (B,) image id of each pair. Pairs i ≠ j with the same id (two captions of one image) are
            not negatives: their scores are set to −∞ in both directions before the cross-entropies. `None` treats
            every other pair as a negative.

    Returns:
        `½ [CE(S, arange B) + CE(Sᵀ, arange B)]`, computed in fp32 so bf16 training with small τ stays finite.
    """
    if logits_per_image.dim() != 2 or logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise ValueError(
            "symmetric InfoNCE needs a square (B, B) score matrix of matched pairs, "
            f"got {tuple(logits_per_image.shape)}"
        )
    logits = logits_per_image.float()
    if image_ids is not None:
        # The mask is symmetric, so masking S masks Sᵀ too: one fill covers both directions. The diagonal is never
        # masked, so every row keeps a finite entry.
        mask = same_image_mask(image_ids.to(logits.device), logits.shape[0])
        logits = logits.masked_fill(mask, float("-inf"))
    targets = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
