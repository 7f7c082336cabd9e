"""`sail`: SAIL's StarMLP projector per modality (Zhang, Yang & Agrawal, CVPR 2025; `docs/methods.md`, section "SAIL").

Each modality has a gated MLP after a LayerNorm, with hidden width `h = width_factor · d_in`:

    u = LN(x)                                     (affine LayerNorm over d_in)
    a = clamp(W₁ u + b₁, ±1e3)    b = clamp(W₂ u + b₂, ±1e3)        (f₁, f₂: d_in -> h)
    StarMLP(x) = W_g (ReLU6(a) ⊙ b) + b_g                             (g: h -> projection_dim)

Inputs (token features):
- image: `x_v = [z_cls ; mean_p z_p]` (d_in = 2 d_v), the CLS token concatenated with the mean of the patch tokens
  (the real ones, by the mask);
- text: `x_t = mean_t z_t` over the real tokens (d_in = d_t).

The model L2-normalises `StarMLP(x)` and trains with its InfoNCE at its temperature.

STRUCTURE (`structure_weight=...`) compares the embeddings with the projector's own inputs `x_v`, `x_t`
(`regularizer_features`): the tokens pooled as the forward pools them. The authors' code has no such reduction for
SAIL's token input (its token-level STRUCTURE runs stop with `NotImplementedError`); STRUCTURE normalises its inputs,
so the concatenation's doubled norm, their reason for not using it, does not weigh on the term.

Authors' defaults (the PAL authors' reproduction, `sail_star_concat` configs): `dim_alignment` 512 (here
`projection_dim`), `width_factor` 8, `concat_cls_patch` true, trained with CLIP's InfoNCE at a fixed τ = 0.05
(hf_align's default `contrastive_temperature`), AdamW lr 1e-3, weight decay 1e-4, batch 4096, cosine schedule. The
±1e3 clamp of f₁, f₂ is theirs (a guard against overflow; inactive at the scale of LayerNorm-ed inputs).

Deviations:
- Loss: the SAIL paper trains with SigLIP's sigmoid loss and a learnable logit bias (scale init 20, bias init −10).
  Every SAIL run of the PAL comparison uses InfoNCE at τ = 0.05 instead (their `SigLipLoss` is in the code but no
  config selects it), and hf_align's model always trains with InfoNCE: `sail` is the StarMLP projector under
  InfoNCE, as compared in PAL's table, not SAIL's sigmoid objective.
- Prefix tokens: the authors take token 0 as the CLS and every later token as a patch. Here the patches start after
  the vision sequence's prefix tokens (`vision_num_prefix_tokens`, set by the model from its config), so register
  tokens are not averaged with the patches, as hf_align's `mean` pooling leaves them out. A sequence with no prefix
  token (a CNN's spatial grid) has no CLS: the mean of all tokens stands in for it, `x_v = [mean ; mean]`, as the
  authors' own fallback for an image without tokens duplicates its pooled vector.
- Only the concatenated image input (`concat_cls_patch: true`, the authors' default) is implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..utils.checks import positive_int
from .base import AlignerMethod, MethodConfig, check_token_input
from .citations import CLIP, SAIL, join
from .registry import register_method
from .token_relative import mean_pool

# The authors' bound on f₁, f₂'s outputs before the gate (their product could overflow fp16/bf16 otherwise).
STAR_CLAMP = 1e3


@dataclass
class SAILConfig(MethodConfig):
    """projection_dim: width of the shared space (the authors' `dim_alignment`, 512). width_factor: StarMLP hidden
    width as a multiple of its input width (8)."""

    check_prefix = "sail: "

    projection_dim: int = positive_int(512)
    width_factor: int = positive_int(8)


def split_vision_tokens(
    method: str, tokens: torch.Tensor, mask: torch.Tensor | None, num_prefix_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(B, T, d) vision tokens -> (global token (B, d), patches (B, P, d), their mask (B, P) or None).

    The global token is the CLS (token 0) when the sequence has prefix tokens, and the patches follow the prefix;
    with no prefix token (a CNN's grid) every token is a patch and their mean stands in for the CLS.
    """
    check_token_input(method, "vision", tokens, mask)
    if tokens.shape[1] <= num_prefix_tokens:
        raise ValueError(
            f"{method}: the vision sequence has {tokens.shape[1]} token(s) but {num_prefix_tokens} prefix token(s) "
            "(vision_num_prefix_tokens): no patch token is left to average"
        )
    patches = tokens[:, num_prefix_tokens:]
    patch_mask = None if mask is None else mask[:, num_prefix_tokens:]
    cls = tokens[:, 0] if num_prefix_tokens else mean_pool(patches, patch_mask)
    return cls, patches, patch_mask


def pooled_token_features(
    method: str, modality: str, tokens: torch.Tensor, mask: torch.Tensor | None, num_prefix_tokens: int
) -> torch.Tensor:
    """One vector per sample from (B, T, d) tokens: image `[CLS ; mean of the real patches]` (B, 2d), text the mean of
    the real tokens (B, d). SAIL's projector inputs, and the reference space `sail` and `freeze_align` give STRUCTURE
    (both pool the CLS and the patches of an image apart, its text tokens by their mean)."""
    if modality == "text":
        check_token_input(method, "text", tokens, mask)
        return mean_pool(tokens, mask)
    cls, patches, patch_mask = split_vision_tokens(method, tokens, mask, num_prefix_tokens)
    return torch.cat([cls, mean_pool(patches, patch_mask)], dim=-1)


class StarMLP(nn.Module):
    """`W_g (ReLU6(clamp(W₁ LN(x) + b₁)) ⊙ clamp(W₂ LN(x) + b₂)) + b_g`, hidden width `width_factor · in_dim`."""

    def __init__(self, in_dim: int, out_dim: int, width_factor: int):
        super().__init__()
        hidden = width_factor * in_dim
        self.norm = nn.LayerNorm(in_dim)
        self.f1 = nn.Linear(in_dim, hidden)
        self.f2 = nn.Linear(in_dim, hidden)
        self.g = nn.Linear(hidden, out_dim)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.norm(x)
        gate = self.f1(u).clamp(-STAR_CLAMP, STAR_CLAMP)
        value = self.f2(u).clamp(-STAR_CLAMP, STAR_CLAMP)
        return self.g(self.act(gate) * value)


@register_method("sail")
class SAILAligner(AlignerMethod):
    config_class = SAILConfig
    input_kind = "tokens"
    regularizer_input_kind = "pooled"
    citation = join(SAIL, CLIP)  # trained with CLIP's InfoNCE, not SAIL's sigmoid loss (module docstring)

    def __init__(self, config: SAILConfig, vision_dim: int, text_dim: int):
        super().__init__(config, vision_dim, text_dim)
        self.embed_dim = config.projection_dim
        self.vision_mlp = StarMLP(2 * vision_dim, config.projection_dim, config.width_factor)
        self.text_mlp = StarMLP(text_dim, config.projection_dim, config.width_factor)

    def regularizer_features(self, modality: str, features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The StarMLP's input (and STRUCTURE's reference space): image `[CLS ; mean of the real patches]`
        (B, 2 d_v), text the mean of its real tokens (B, d_t)."""
        return pooled_token_features("sail", modality, features, mask, self.vision_num_prefix_tokens)

    def embed_image(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, d_v) tokens + (B, T) mask -> (B, projection_dim) `StarMLP_v([CLS ; mean of the real patches])`."""
        return self.vision_mlp(pooled_token_features("sail", "vision", features, mask, self.vision_num_prefix_tokens))

    def embed_text(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, d_t) tokens + (B, T) mask -> (B, projection_dim) `StarMLP_t(mean of the real tokens)`."""
        return self.text_mlp(pooled_token_features("sail", "text", features, mask, self.vision_num_prefix_tokens))
