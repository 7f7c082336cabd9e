"""`freeze_align`: Freeze-Align's token projectors, the `combined_vis_cls` variant (Maniparambil et al., CVPR 2025;
`docs/methods.md`, section "Freeze-Align").

A patch projection maps a token `z` (width d) to the shared width D with a linear and a non-linear branch:

    Proj(z) = W z + b  +  W'' GELU(W' z + b') + b''                   (W, W': d -> D; W'': D -> D)
    P(z)    = Proj(dropout(LN(z)))                                     (affine LayerNorm over d)

Image (token features: CLS, then patches), two patch projections with their own weights, summed:

    v = mean_p P_local(z_p)  +  P_cls(z_cls)

Text: a patch projection on every token, the mean over the real tokens, then a projection head with LayerNorm:

    s = mean_t P_text(z_t)
    q = W_h s + b_h          t = LN_h(q + dropout(W_f GELU(q) + b_f))   (W_h, W_f: D -> D)

The model L2-normalises `v` and `t` and trains with its InfoNCE at its temperature.

STRUCTURE (`structure_weight=...`) compares the embeddings with `[z_cls ; mean_p z_p]` for images and `mean_t z_t` for
texts (`regularizer_features`): the tokens pooled as the forward pools them, the CLS and the patches apart. The
authors' code has no reduction for Freeze-Align's token input (its token-level STRUCTURE runs stop with
`NotImplementedError`).

Authors' defaults (the PAL authors' reproduction, `fa_d512` configs): `embed_dim` 512 (here `projection_dim`),
`dropout` 0.1, trained with CLIP's InfoNCE at a fixed τ = 0.05 (hf_align's default `contrastive_temperature`), AdamW
lr 1e-3, weight decay 1e-4, batch 4096, cosine schedule.

Deviations:
- Temperature: Freeze-Align's own code learns it (clamped to [0.001, 0.5]); the PAL comparison fixes τ = 0.05 for
  every method, and so does hf_align's default (`learnable_temperature=True` gives a learned one).
- SPARC's fine-grained loss of the original is left out, as in the PAL comparison: the objective is InfoNCE alone.
- Prefix tokens: the authors take token 0 as the CLS and every later token as a patch. Here the patches start after
  the vision sequence's prefix tokens (`vision_num_prefix_tokens`, set by the model from its config), so register
  tokens are not averaged with the patches. A sequence with no prefix token (a CNN's grid) has no CLS: the mean of
  the tokens goes through `P_cls` in its place.
- Image tokens are averaged over the real patches by the mask (the authors average every patch; images have no
  padding there, so the two agree on unpadded input).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..utils.checks import number, positive_int
from .base import AlignerMethod, MethodConfig, check_token_input
from .citations import FREEZE_ALIGN
from .registry import register_method
from .sail import pooled_token_features, split_vision_tokens
from .token_relative import mean_pool


@dataclass
class FreezeAlignConfig(MethodConfig):
    """projection_dim: width D of the shared space (the authors' `embed_dim`, 512). dropout: after each token
    LayerNorm and in the text head (0.1)."""

    check_prefix = "freeze_align: "

    projection_dim: int = positive_int(512)
    dropout: float = number(0.1, 0.0, 1.0, high_inclusive=False)


class PatchProjection(nn.Module):
    """`Proj(dropout(LN(z)))` with `Proj(z) = W z + b + W'' GELU(W' z + b') + b''`, per token."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_dim, out_dim)
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        u = self.dropout(self.norm(z))
        return self.linear(u) + self.fc2(self.act(self.fc1(u)))


class ProjectionHead(nn.Module):
    """`LN(q + dropout(W_f GELU(q) + b_f))` with `q = W_h s + b_h` (the text side's last stage)."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.projection = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.fc = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        q = self.projection(s)
        return self.norm(q + self.dropout(self.fc(self.act(q))))


@register_method("freeze_align")
class FreezeAlignAligner(AlignerMethod):
    config_class = FreezeAlignConfig
    input_kind = "tokens"
    regularizer_input_kind = "pooled"
    citation = FREEZE_ALIGN

    def __init__(self, config: FreezeAlignConfig, vision_dim: int, text_dim: int):
        super().__init__(config, vision_dim, text_dim)
        dim, dropout = config.projection_dim, config.dropout
        self.embed_dim = dim
        self.local_vision_proj = PatchProjection(vision_dim, dim, dropout)
        self.cls_vision_proj = PatchProjection(vision_dim, dim, dropout)
        self.local_text_proj = PatchProjection(text_dim, dim, dropout)
        self.text_head = ProjectionHead(dim, dropout)

    def regularizer_features(self, modality: str, features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """STRUCTURE's reference space, pooled as the forward pools: image `[CLS ; mean of the real patches]`
        (B, 2 d_v), text the mean of its real tokens (B, d_t)."""
        return pooled_token_features("freeze_align", modality, features, mask, self.vision_num_prefix_tokens)

    def embed_image(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, d_v) tokens + (B, T) mask -> (B, D) `mean_p P_local(z_p) + P_cls(z_cls)`."""
        cls, patches, patch_mask = split_vision_tokens("freeze_align", features, mask, self.vision_num_prefix_tokens)
        return mean_pool(self.local_vision_proj(patches), patch_mask) + self.cls_vision_proj(cls)

    def embed_text(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, d_t) tokens + (B, T) mask -> (B, D) `head(mean_t P_text(z_t))`."""
        check_token_input("freeze_align", "text", features, mask)
        return self.text_head(mean_pool(self.local_text_proj(features), mask))
