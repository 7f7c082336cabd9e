"""`attention_pool`: multihead attention pooling (MAP) of the token features, one learned query per modality, then a
residual MLP head (`docs/methods.md`, attention pooling). It is the control that PAL compares its cross-attention
pooling (CAP, `token_relative`) with: a learned cross-attention pooler with full projections, where CAP pools cosine
profiles to anchors and has no projection at all.

Per modality, with tokens `z_t` (image: CLS and patches; text: every non-padding token), width D = `projection_dim`,
H = `num_heads` heads of width h = D / H:

    k_t = W_k (W_in z_t + b_in) + b_k,   v_t = W_v (W_in z_t + b_in) + b_v,   q = W_q q₀ + b_q   (q₀ ∈ ℝ^D learned)
    α_t^(j) = softmax_t( q^(j) · k_t^(j) / √h )                  (per head j; padding tokens masked out)
    c = W_o concat_j( Σ_t α_t^(j) v_t^(j) ) + b_o
    e = c + W_2 GELU(W_1 LayerNorm(c) + b_1) + b_2              (the residual MLP head)

and the model L2-normalises `e` and scores image–text pairs by its similarity head, trained with InfoNCE. Pooling
then projecting is the authors' order too: the tokens are first mapped to the shared width D (`W_in`), the attention
and the head work at that width.

**Authors' defaults** (PAL's control configuration, `attn_pool_d512_token`): D = 512, 8 heads, MLP hidden width
4·D = 2048 (`hidden_dim`), no attention dropout, InfoNCE at τ = 0.05, no STRUCTURE term. Initialisation as theirs,
which is `nn.MultiheadAttention`'s: `W_q`, `W_k`, `W_v` uniform in ±√(6 / 4D) (Xavier over the stacked (3D, D)
matrix), their biases and `b_o` zero, `q₀ ~ N(0, 0.02²)`; `W_in`, `W_o` and the MLP keep PyTorch's `nn.Linear`
default.

**Deviations.** The authors also accept one pooled vector (a sequence of length 1); this method takes tokens only
(`input_kind="tokens"`), as every token method here does. The attention is written out (scores, mask, softmax,
weighted sum) as theirs is, rather than through `scaled_dot_product_attention`, so that a test can recompute it op by
op.

**STRUCTURE.** The authors' control runs without it (λ = 0), but their layer defines what it would compare: the
mean of the tokens. Here too (`regularizer_features`): with `structure_weight=...` the `structure` regulariser
compares the embeddings' geometry with that of the mean of each sample's real tokens (the authors' reduction takes
every token, padding included, since it receives no mask; here padding is left out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..utils.checks import number, positive_int
from .base import AlignerMethod, MethodConfig
from .citations import CLIP, PAL, SET_TRANSFORMER, join
from .registry import register_method
from .token_relative import mean_pool


@dataclass
class AttentionPoolConfig(MethodConfig):
    """projection_dim: D, the width of the attention and of the embeddings (a multiple of `num_heads`). num_heads:
    attention heads. hidden_dim: hidden width of the residual MLP head (the authors' 4·D). dropout: on the attention
    weights while training."""

    check_prefix = "attention_pool: "

    projection_dim: int = positive_int(512)
    num_heads: int = positive_int(8)
    hidden_dim: int = positive_int(2048)
    dropout: float = number(0.0, low=0.0, high=1.0, high_inclusive=False)

    def __post_init__(self):
        super().__post_init__()
        if self.projection_dim % self.num_heads:
            raise ValueError(
                f"attention_pool: projection_dim={self.projection_dim} must be a multiple of num_heads="
                f"{self.num_heads} (each head attends over projection_dim / num_heads dimensions)"
            )


class AttentionPoolHead(nn.Module):
    """One modality's pooler: (B, T, d) tokens + (B, T) mask -> (B, D) (module docstring)."""

    def __init__(self, in_dim: int, config: AttentionPoolConfig):
        super().__init__()
        width = config.projection_dim
        self.num_heads = config.num_heads
        self.in_proj = nn.Linear(in_dim, width)
        self.query = nn.Parameter(torch.empty(1, width))
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.attention_dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, config.hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.hidden_dim, width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """`nn.MultiheadAttention`'s initialisation of the attention core (module docstring). The `nn.init` calls are
        no-ops on parameters loaded from a checkpoint (transformers guards them)."""
        width = self.query.shape[1]
        bound = math.sqrt(6.0 / (4 * width))  # Xavier-uniform of the stacked (3D, D) in-projection
        for layer in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.uniform_(layer.weight, -bound, bound)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.out_proj.bias)
        nn.init.normal_(self.query, std=0.02)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = tokens.shape
        projected = self.in_proj(tokens)
        keys = self.k_proj(projected).view(batch, length, self.num_heads, -1).transpose(1, 2)  # (B, H, T, h)
        values = self.v_proj(projected).view(batch, length, self.num_heads, -1).transpose(1, 2)
        query = self.q_proj(self.query).view(self.num_heads, 1, -1)  # (H, 1, h), one query for every sample
        scores = (keys @ query.transpose(-1, -2)).squeeze(-1) / math.sqrt(keys.shape[-1])  # (B, H, T)
        if mask is not None:
            scores = scores.masked_fill(~mask.bool()[:, None, :], float("-inf"))
        weights = self.attention_dropout(scores.softmax(dim=-1))
        context = (weights.unsqueeze(-2) @ values).reshape(batch, -1)  # (B, H, 1, h) -> (B, D)
        pooled = self.out_proj(context)
        return pooled + self.fc2(self.act(self.fc1(self.norm(pooled))))


@register_method("attention_pool")
class AttentionPoolAligner(AlignerMethod):
    config_class = AttentionPoolConfig
    input_kind = "tokens"
    regularizer_input_kind = "pooled"
    # CLIP's objective; the pooler is Set Transformer's PMA (as in ViT / SigLIP heads); PAL uses it as CAP's control
    citation = join(CLIP, SET_TRANSFORMER, PAL)

    def __init__(self, config: AttentionPoolConfig, vision_dim: int, text_dim: int):
        super().__init__(config, vision_dim, text_dim)
        self.embed_dim = config.projection_dim
        self.vision_head = AttentionPoolHead(vision_dim, config)
        self.text_head = AttentionPoolHead(text_dim, config)

    def embed_image(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.vision_head(features, mask)

    def embed_text(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.text_head(features, mask)

    def regularizer_features(self, modality: str, features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """STRUCTURE's reference space: (B, T, d) tokens + (B, T) mask -> (B, d) mean of the real tokens."""
        return mean_pool(features, mask)
