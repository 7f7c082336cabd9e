"""`token_relative`: token-level relative representations with learnable anchors and cross-attention pooling
(PAL, "projection-free anchor learning"; `docs/methods.md` §5.3).

Per modality, K anchors (`A_v` (K, d_v), `A_t` (K, d_t)) drawn from N(0, 1) and L2-normalised are the only trained
parameters. Every token t of a sample (image: CLS + patches; text: every non-padding token) gets its relative vector
`R[t, k] = cos(z_t, a_k)`. Cross-attention pooling (CAP) gives one K-dim profile per sample, one softmax over the
tokens per anchor:

    α[t, k] = softmax_t(R[t, k] / τ_p)      (padding masked out)
    p[k]    = Σ_t α[t, k] R[t, k]            h = p / ‖p‖

and image–text similarity is `h_v · h_t` (the model normalises and scores by cosine), trained with InfoNCE.
`pooling="mean"` replaces CAP by the mean of `R` over the real tokens (the paper's ablation).

`projector_dim=m > 0` adds the authors' bottleneck projector ablation (their `token_k512_proj512` config, m = 512):
before the cosines, every token goes through a residual bottleneck per modality, `z + W_up GELU(W_down z + b_down) +
b_up` with `W_down` (m, d), `W_up` (d, m) and `W_up`, `b_up` zero at initialisation, so training starts from the
projection-free method. PAL applies it to tokens only (its pooled-CLS path skips it); here every input is tokens.

Late interaction (for each word the best-matching patch, `max_p cos(R_v[p], R_t[w])`, averaged over the words)
cannot be written as a dot product of one vector per sample, so it is an evaluation-time score on a trained model:
`late_interaction_scores(...)`; it is not a `pooling` choice (asking for one raises an error that says so).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..functional.relative_representations import relative_representation
from ..utils.checks import nonnegative_int, number, positive_int
from .base import AlignerMethod, MethodConfig, check_token_input
from .citations import PAL, RELATIVE_REPRESENTATIONS, join
from .registry import register_method

POOLINGS = ("cap", "mean")


@dataclass
class TokenRelativeConfig(MethodConfig):
    """num_anchors: K anchors per modality (the embedding width; PAL uses 512). pool_temperature: τ_p of the
    cross-attention pooling (PAL: 0.03, swept 0.02–0.10). pooling: `cap` (cross-attention pooling) or `mean`.
    projector_dim: width of the residual bottleneck projector applied to the tokens first (0: none, PAL's default
    and the projection-free method; 512 in the authors' `token_k512_proj512` ablation)."""

    check_prefix = "token_relative: "

    num_anchors: int = positive_int(512)
    pool_temperature: float = number(0.03, low=0.0, low_inclusive=False, expected="a finite number > 0")
    pooling: str = "cap"
    projector_dim: int = nonnegative_int(0, expected="an int >= 0 (0: no projector)")

    def __post_init__(self):
        super().__post_init__()
        # not a declared one_of: late interaction, which is no pooling, gets a message of its own
        if self.pooling == "late_interaction":
            raise ValueError(
                "token_relative: late interaction scores image-text pairs token by token and has no single embedding "
                "per sample, so it is not a pooling: train with pooling='cap' (or 'mean') and score a trained model "
                "with hf_align.methods.token_relative.late_interaction_scores(model, ...)"
            )
        if self.pooling not in POOLINGS:
            raise ValueError(f"token_relative: pooling must be one of {POOLINGS}, got {self.pooling!r}")


class BottleneckProjector(nn.Module):
    """(..., d) -> (..., d): `z + up(GELU(down(z)))`; `TokenRelativeAligner.reset_parameters` sets `up` to zero, so
    the projector starts as the identity map."""

    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.up(F.gelu(self.down(tokens)))


def cross_attention_pool(relative: torch.Tensor, mask: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """CAP: (B, T, K) token relative vectors + (B, T) mask -> (B, K) profiles `p` (not normalised).

    One softmax over the real tokens per anchor: `α[:, k] = softmax_t(R[:, k] / τ)`, `p[k] = Σ_t α[t, k] R[t, k]`,
    for every sample and anchor at once (padding gets `α = 0`). Differentiable in `relative`.
    """
    return _CrossAttentionPool.apply(relative, mask, temperature)


class _CrossAttentionPool(torch.autograd.Function):
    """CAP with its gradient written out: `∂p[k] / ∂R[t, k] = α[t, k] (1 + (R[t, k] - p[k]) / τ)`.

    Autograd through the division, `masked_fill`, softmax and weighted sum allocates four (B, T, K) tensors in the
    backward pass; this backward allocates one and updates it in place. Such a tensor is the token batch times K
    (4096 images x 257 tokens x 512 anchors: 2 GB in fp32), and CAP's cost is the passes over it, not its FLOPs.
    """

    @staticmethod
    def forward(ctx, relative: torch.Tensor, mask: torch.Tensor | None, temperature: float) -> torch.Tensor:
        # fp32 whatever `relative` is (bf16 under autocast): the softmax of R / τ amplifies rounding by 1/τ, so it and
        # the profiles are fp32 on every device (CUDA's autocast runs softmax in fp32, the CPU's does not).
        logits = relative.float() / temperature
        if mask is not None:
            logits.masked_fill_(~mask.bool()[..., None], float("-inf"))
        weights = torch.softmax(logits, dim=1)
        del logits  # freed before the product below allocates: one (B, T, K) tensor less at the peak
        pooled = (weights * relative).sum(dim=1)
        ctx.save_for_backward(relative, weights, pooled)
        ctx.temperature = temperature
        return pooled

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_pooled: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        relative, weights, pooled = ctx.saved_tensors
        tau = ctx.temperature
        # α (1 + (R - p) / τ) g  =  (R - (p - τ)) · α · (g / τ); padding has α = 0 and gets no gradient.
        grad = relative - (pooled - tau)[:, None, :]
        grad.mul_(weights).mul_((grad_pooled / tau)[:, None, :])
        return grad, None, None


def mean_pool(relative: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, C) + (B, T) mask -> (B, C) mean over the real tokens (of relative vectors, C = K, or of tokens)."""
    if mask is None:
        return relative.mean(dim=1)
    weights = mask.to(relative.dtype)[..., None]
    return (relative * weights).sum(dim=1) / weights.sum(dim=1)


def _check_real_tokens(modality: str, mask: torch.Tensor | None) -> None:
    if mask is None:
        return
    empty = (~mask.bool().any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{modality} sample(s) {empty[:8]} have no real token (all-padding mask)")


@register_method("token_relative")
class TokenRelativeAligner(AlignerMethod):
    config_class = TokenRelativeConfig
    input_kind = "tokens"
    citation = join(PAL, RELATIVE_REPRESENTATIONS)

    def __init__(self, config: TokenRelativeConfig, vision_dim: int, text_dim: int):
        super().__init__(config, vision_dim, text_dim)
        self.embed_dim = config.num_anchors
        self.vision_anchors = nn.Parameter(torch.empty(config.num_anchors, vision_dim))
        self.text_anchors = nn.Parameter(torch.empty(config.num_anchors, text_dim))
        if config.projector_dim:
            self.vision_projector = BottleneckProjector(vision_dim, config.projector_dim)
            self.text_projector = BottleneckProjector(text_dim, config.projector_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for anchors in (self.vision_anchors, self.text_anchors):
            # nn.init.normal_ is a no-op on parameters loaded from a checkpoint (transformers guards it): so is this.
            if getattr(anchors, "_is_hf_initialized", False) or anchors.is_meta:
                continue
            nn.init.normal_(anchors)
            with torch.no_grad():
                anchors.copy_(F.normalize(anchors, dim=-1))
        # The projectors' `up` layers start at zero. This runs after their own nn.Linear reset (transformers' init
        # visits children first), and leaves weights loaded from a checkpoint alone, like the anchors above.
        for projector in (getattr(self, "vision_projector", None), getattr(self, "text_projector", None)):
            for weight in (projector.up.weight, projector.up.bias) if projector is not None else ():
                if not (getattr(weight, "_is_hf_initialized", False) or weight.is_meta):
                    with torch.no_grad():
                        weight.zero_()

    # ------------------------------------------------------------------ token relative vectors
    def projected(self, tokens: torch.Tensor, modality: str) -> torch.Tensor:
        """The tokens after this modality's bottleneck projector (`projector_dim > 0`), else unchanged."""
        if not self.config.projector_dim:
            return tokens
        return (self.vision_projector if modality == "vision" else self.text_projector)(tokens)

    def token_relative(self, tokens: torch.Tensor, modality: str) -> torch.Tensor:
        """(B, T, d) tokens -> (B, T, K) `R[t, k] = cos(z_t, a_k)` against this modality's anchors (after the
        projector, when there is one)."""
        anchors = self.vision_anchors if modality == "vision" else self.text_anchors
        return relative_representation(self.projected(tokens, modality), anchors)

    def profiles(self, tokens: torch.Tensor, mask: torch.Tensor | None, modality: str) -> torch.Tensor:
        """(B, T, d) tokens + (B, T) mask -> (B, K) pooled profiles `p` (not normalised), all samples at once."""
        if self.config.pooling == "cap":
            return cross_attention_pool(self.token_relative(tokens, modality), mask, self.config.pool_temperature)
        # A mean of cosines is linear in the unit tokens: mean_t (ẑ_t · â_k) = (mean_t ẑ_t) · â_k. Averaging the unit
        # tokens first makes it one (B, d) x (d, K) product instead of a (B, T, d) x (d, K) one: T times fewer FLOPs.
        anchors = self.vision_anchors if modality == "vision" else self.text_anchors
        mean_unit_token = mean_pool(F.normalize(self.projected(tokens, modality).float(), dim=-1), mask)  # (B, d)
        return relative_representation(mean_unit_token, F.normalize(anchors.float(), dim=-1), normalize=False)

    def embed_image(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_token_input("token_relative", "vision", features, mask)
        return self.profiles(features, mask, "vision")

    def embed_text(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_token_input("token_relative", "text", features, mask)
        return self.profiles(features, mask, "text")

    def embed_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, P, d_v) patch tokens -> (B, P, K) `S_pa = cos(patch, image anchors)`, not renormalised (segmentation)."""
        return self.token_relative(tokens, "vision")

    @torch.no_grad()
    def late_interaction_scores(
        self,
        vision_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        vision_mask: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        block_elements: int = 2**25,
    ) -> torch.Tensor:
        """(Bi, Bt) late-interaction similarity: per word, the best patch by cosine of token relative vectors,
        averaged over the caption's real words. Padding tokens never count (masked patches never win a max).

        vision_tokens (Bi, P, d_v) + mask (Bi, P); text_tokens (Bt, W, d_t) + mask (Bt, W). The (images, texts, W, P)
        patch-word cosines are computed in blocks of at most `block_elements` entries (128 MB in fp32), so a
        5k-caption gallery against 257-token images never materialises at once.
        """
        for modality, tokens, mask in (("vision", vision_tokens, vision_mask), ("text", text_tokens, text_mask)):
            check_token_input("token_relative", modality, tokens, mask)
            _check_real_tokens(modality, mask)
        n_images, n_patches = vision_tokens.shape[:2]
        n_texts, n_words = text_tokens.shape[:2]
        text_rel = F.normalize(self.token_relative(text_tokens, "text"), dim=-1)  # (Bt, W, K)
        if text_mask is None:
            text_mask = torch.ones(n_texts, n_words, dtype=torch.bool, device=text_rel.device)
        words = text_mask.to(text_rel.dtype)
        text_chunk = max(1, min(n_texts, block_elements // (n_words * n_patches)))
        image_chunk = max(1, block_elements // (text_chunk * n_words * n_patches))
        scores = torch.empty(n_images, n_texts, device=text_rel.device)
        for i in range(0, n_images, image_chunk):
            vision_rel = F.normalize(self.token_relative(vision_tokens[i : i + image_chunk], "vision"), dim=-1)
            for j in range(0, n_texts, text_chunk):
                pairs = torch.einsum("ipk,jwk->ijwp", vision_rel, text_rel[j : j + text_chunk])  # (bi, bt, W, P)
                if vision_mask is not None:
                    pairs = pairs.masked_fill(~vision_mask[i : i + image_chunk].bool()[:, None, None, :], float("-inf"))
                chunk_words = words[j : j + text_chunk]
                best = pairs.amax(dim=-1) * chunk_words[None]  # (bi, bt, W); padding words count 0
                scores[i : i + image_chunk, j : j + text_chunk] = best.sum(-1) / chunk_words.sum(-1)[None]
        return scores


@torch.no_grad()
def late_interaction_scores(
    model,
    vision_features: torch.Tensor,
    text_features: torch.Tensor,
    vision_mask: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Late-interaction (n_images, n_texts) scores of a trained `token_relative` `AlignerModel` on token features.

    Same inputs as `model.get_image_features(vision_features=..., vision_mask=...)` / `get_text_features`; usable with
    `hf_align.evaluation.retrieval_metrics` in place of `model.similarity(image_embeds, text_embeds)`.
    """
    aligner = model.aligner
    if not isinstance(aligner, TokenRelativeAligner):
        raise ValueError(
            f"late interaction scores need a token_relative aligner, this model's method is {model.config.method!r}"
        )
    vision_features, vision_mask = model._check_features("vision", vision_features, vision_mask)
    text_features, text_mask = model._check_features("text", text_features, text_mask)
    return aligner.late_interaction_scores(vision_features, text_features, vision_mask, text_mask)
