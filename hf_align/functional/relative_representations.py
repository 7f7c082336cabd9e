"""Relative representations (Moschella et al.): a sample described by its similarities to a set of anchors.

With *paired* anchors (anchor k is an image in vision space and its caption in text space) the relative vectors of an
image and of a text live in the same K-dimensional space, which is what the `asif`, `relative` and `token_relative`
aligners build on (the `relative` aligner itself is `hf_align.methods.relative`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def relative_representation(x: torch.Tensor, anchors: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Similarity of every vector of `x` to every anchor.

    Args:
        x: (..., d) vectors: (n, d) pooled features, (B, T, d) token sequences, ...
        anchors: (K, d) anchors in the same space.
        normalize: `True` gives cosine similarities `cos(x, a_k)`; `False` plain dot products `x · a_k`.

    Returns:
        (..., K): entry k is the similarity of the vector to anchor k. Computed in fp32 (fp16 token caches included).
    """
    if anchors.dim() != 2:
        raise ValueError(f"anchors must be a (K, d) matrix, got shape {tuple(anchors.shape)}")
    if x.dim() < 1 or x.shape[-1] != anchors.shape[-1]:
        raise ValueError(
            f"x has width {x.shape[-1] if x.dim() else None} but the anchors have width {anchors.shape[-1]}: "
            f"x {tuple(x.shape)}, anchors {tuple(anchors.shape)}"
        )
    x = x.float()
    anchors = anchors.float()
    if normalize:
        x = F.normalize(x, dim=-1)
        anchors = F.normalize(anchors, dim=-1)
    return x @ anchors.t()


def pick_anchor_pairs(
    vision_features: torch.Tensor, text_features: torch.Tensor, num_anchors: int, seed: int = 0, method: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """`num_anchors` distinct training pairs drawn at random with `seed`: (K, d_v) images and their (K, d_t) texts.

    `vision_features` (N, d_v) and `text_features` (N, d_t) are pooled features of N pairs (row i of each is pair
    i); `method` names the caller in errors.
    """
    owner = method or "this method"
    for name, features in (("vision", vision_features), ("text", text_features)):
        if features.dim() != 2:
            raise ValueError(f"{owner} takes pooled (N, d) {name} features, got shape {tuple(features.shape)}")
    n_pairs = vision_features.shape[0]
    if text_features.shape[0] != n_pairs:
        raise ValueError(f"{owner} anchors are pairs: got {n_pairs} images and {text_features.shape[0]} texts")
    if num_anchors > n_pairs:
        raise ValueError(
            f"{owner} wants num_anchors={num_anchors} paired anchors but init_from_data got only {n_pairs} training "
            "pairs: lower num_anchors or give more pairs (AlignmentArguments.init_samples)"
        )
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(n_pairs, generator=generator)[:num_anchors].sort().values  # sorted: readable anchors
    index = index.to(vision_features.device)
    return vision_features[index], text_features[index]


__all__ = ["pick_anchor_pairs", "relative_representation"]
