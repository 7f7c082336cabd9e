"""STRUCTURE regularisation (METHODS.md §2): keep, in the aligned space, the neighbourhood structure each frozen
encoder had.

For one modality with frozen batch features X (B, d) and their aligned embeddings A = f(X) (B, D):

1. rows are L2-normalised, then (with `centering=True`) the batch mean is subtracted;
2. `P_X = softmax_row(X Xᵀ / τ)` (the diagonal is kept), likewise `P_A`; level l compares the l-th matrix powers
   `P_X^l`, `P_A^l` (random walks of l hops on the batch similarity graph);
3. the level divergence is the mean over rows of either the Jensen–Shannon divergence (`divergence="js"`,
   ½ KL(P_X‖M) + ½ KL(P_A‖M), M = ½(P_X + P_A), natural log, in [0, ln 2]) or the variant the authors' code computes
   (`divergence="authors_rkl"`, ½ [KL(M‖P_A) + KL(M‖P_X)], "reverse" KLs from the mixture; not bounded by ln 2);
4. `R_S = (1/L) Σ_l w_l · relu(D_l − margin)` with `w_l = 1` (`weighting="none"`) or `1/l` (`"inverse"`).

`levels`: an int L means the L levels 1, 2, …, L (METHODS.md's L ∈ {1, 2, 3, 5} is the number of levels); a list
of ints names the matrix powers explicitly (e.g. `[1, 3]`), and 1/L then divides by its length.

The registered regulariser `"structure"` adds `λ_t · ½ (R_S(image) + R_S(text))` to the training loss, with the
frozen tapped-layer features and the aligned embeddings of the batch, and `λ_t = weight · min(1, t / warmup_steps)`.
The counter t is a persistent buffer (`steps_done`, saved in checkpoints and `save_pretrained`): it advances by one
at every forward call made in training mode, and t is its value after that increment, so the k-th training batch uses
`weight · min(1, k / warmup_steps)`; eval-mode calls use the current value without advancing it (a fresh model reports
0). One forward call per optimisation step is what `hf_align.train` does without gradient accumulation; with
`gradient_accumulation_steps = g` the counter sees g calls per step, so pass `warmup_steps = 1000·g` to warm up over
1000 optimiser steps.

The regulariser needs pooled features (one vector per sample); token sequences (B, T, d) are rejected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Regularizer, RegularizerConfig
from .registry import register_regularizer

WEIGHTINGS = ("none", "inverse")
DIVERGENCES = ("js", "authors_rkl")

__all__ = ["DIVERGENCES", "WEIGHTINGS", "StructureConfig", "StructureRegularizer", "structure_regularizer"]


def _check_levels(levels) -> list[int]:
    if isinstance(levels, int) and not isinstance(levels, bool):
        if levels < 1:
            raise ValueError(
                f"levels must be a positive int (the number of levels) or a list of powers, got {levels!r}"
            )
        return list(range(1, levels + 1))
    if isinstance(levels, Sequence) and not isinstance(levels, str) and levels:
        out = list(levels)
        if all(isinstance(l, int) and not isinstance(l, bool) and l >= 1 for l in out) and len(set(out)) == len(out):
            return out
    raise ValueError(
        f"levels must be a positive int (levels 1..L) or a non-empty list of distinct positive ints, got {levels!r}"
    )


def _check_options(tau, weighting, margin, divergence) -> None:
    if not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite float > 0, got {tau!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not (
        isinstance(margin, (int, float)) and not isinstance(margin, bool) and math.isfinite(margin) and margin >= 0
    ):
        raise ValueError(f"margin must be a finite float >= 0, got {margin!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def _check_pooled(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2:
        kind = "token features (B, T, d)" if x.dim() == 3 else f"a tensor of shape {tuple(x.shape)}"
        raise ValueError(
            f"STRUCTURE regularisation needs pooled features, one vector per sample (B, d); {name} is {kind}. "
            "Use it with a pooled method (cls/mean pooling), not a token method"
        )


def _log_transitions(x: torch.Tensor, tau: float, centering: bool, powers: list[int]) -> dict[int, torch.Tensor]:
    """log P^l for every requested power l, P = softmax_row(x̂ x̂ᵀ / τ): (B, B) each, float32.

    Level 1 comes straight from log_softmax (exact even where P underflows); higher powers take the log of the matrix
    power, clamped at the smallest normal float so a zero entry gives a large finite log rather than -inf.
    """
    x = F.normalize(x.float(), dim=1)
    if centering:
        x = x - x.mean(dim=0, keepdim=True)
    log_p = torch.log_softmax(x @ x.T / tau, dim=1)
    out = {1: log_p} if 1 in powers else {}
    if max(powers) > 1:
        p = power = log_p.exp()
        for level in range(2, max(powers) + 1):
            power = power @ p
            if level in powers:
                out[level] = power.clamp_min(torch.finfo(power.dtype).tiny).log()
    return out


def _row_divergence(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str) -> torch.Tensor:
    """Mean over rows of JS(p, q) or ½[KL(m‖q) + KL(m‖p)], m = ½(p + q); inputs are (B, B) log-probabilities."""
    p, q = log_p.exp(), log_q.exp()
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    if divergence == "js":
        per_row = 0.5 * (p * (log_p - log_m)).sum(1) + 0.5 * (q * (log_q - log_m)).sum(1)
    else:
        m = log_m.exp()
        per_row = 0.5 * (m * (log_m - log_q)).sum(1) + 0.5 * (m * (log_m - log_p)).sum(1)
    return per_row.mean()


def structure_regularizer(
    frozen: torch.Tensor,
    aligned: torch.Tensor,
    levels: int | Sequence[int] = 1,
    tau: float = 0.05,
    weighting: str = "none",
    margin: float = 0.0,
    divergence: str = "js",
    centering: bool = True,
) -> torch.Tensor:
    """R_S for one modality: how much the aligned batch geometry departs from the frozen one (a scalar, >= 0).

    Args:
        frozen: (B, d) frozen features of the batch (no gradient flows into them).
        aligned: (B, D) aligned embeddings of the same B samples (any D; normalised here).
        levels: number of levels L (powers 1..L) or an explicit list of powers.
        tau: softmax temperature of the transition matrices.
        weighting: `none` (w_l = 1) or `inverse` (w_l = 1/l).
        margin: divergence below which a level costs nothing (`relu(D_l − margin)`).
        divergence: `js` (Jensen–Shannon) or `authors_rkl` (½[KL(M‖P_A) + KL(M‖P_X)]).
        centering: subtract the batch mean after L2 normalisation.

    Returns 0 (up to rounding) when `aligned` equals `frozen` up to a rotation and an isotropic scale.
    """
    powers = _check_levels(levels)
    _check_options(tau, weighting, margin, divergence)
    _check_pooled("frozen", frozen)
    _check_pooled("aligned", aligned)
    if frozen.shape[0] != aligned.shape[0]:
        raise ValueError(
            f"frozen and aligned must hold the same samples: got {frozen.shape[0]} and {aligned.shape[0]} rows"
        )
    if frozen.shape[0] < 2:
        raise ValueError(f"STRUCTURE needs a batch of at least 2 samples, got {frozen.shape[0]}")
    with torch.no_grad():
        log_frozen = _log_transitions(frozen, tau, centering, powers)
    log_aligned = _log_transitions(aligned, tau, centering, powers)
    total = aligned.new_zeros((), dtype=torch.float32)
    for level in powers:
        weight = 1.0 if weighting == "none" else 1.0 / level
        value = _row_divergence(log_frozen[level].to(aligned.device), log_aligned[level], divergence)
        total = total + weight * torch.relu(value - margin)
    return total / len(powers)


@dataclass
class StructureConfig(RegularizerConfig):
    """Settings of the `structure` regulariser (`AlignerModel.from_encoders(..., regularizers={"structure": {...}})`
    or the shorthand `structure_<field>=...`).

    weight: λ (the METHODS.md default is 10). warmup_steps: training forward calls over which λ ramps up linearly from
    0 (0 = full weight at once). The other fields are those of `structure_regularizer`.
    """

    weight: float = 10.0
    levels: int | list[int] = 1
    tau: float = 0.05
    weighting: str = "none"
    margin: float = 0.0
    divergence: str = "js"
    centering: bool = True
    warmup_steps: int = 1000

    def __post_init__(self):
        if not (isinstance(self.weight, (int, float)) and not isinstance(self.weight, bool) and self.weight >= 0):
            raise ValueError(f"structure weight must be a float >= 0, got {self.weight!r}")
        if not (
            isinstance(self.warmup_steps, int) and not isinstance(self.warmup_steps, bool) and self.warmup_steps >= 0
        ):
            raise ValueError(f"structure warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.centering, bool):
            raise ValueError(f"structure centering must be a bool, got {self.centering!r}")
        _check_levels(self.levels)
        _check_options(self.tau, self.weighting, self.margin, self.divergence)

    def function_kwargs(self) -> dict:
        return dict(
            levels=self.levels,
            tau=self.tau,
            weighting=self.weighting,
            margin=self.margin,
            divergence=self.divergence,
            centering=self.centering,
        )


@register_regularizer("structure")
class StructureRegularizer(Regularizer):
    """`λ_t · ½ (R_S(vision features, image embeds) + R_S(text features, text embeds))`; see the module docstring."""

    config_class = StructureConfig

    def __init__(self, config: StructureConfig):
        super().__init__(config)
        # Training forward calls seen so far (the warm-up clock); a persistent buffer, so checkpoints carry it.
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def reset_parameters(self) -> None:
        # nn.init keeps transformers' guard: a counter loaded from a checkpoint is not reset by post-load init.
        nn.init.zeros_(self.steps_done)

    def current_weight(self) -> float:
        """λ_t for the counter's present value."""
        warmup = self.config.warmup_steps
        ramp = 1.0 if warmup == 0 else min(1.0, int(self.steps_done) / warmup)
        return self.config.weight * ramp

    def forward(
        self,
        vision_features: torch.Tensor,
        text_features: torch.Tensor,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
    ) -> torch.Tensor:
        _check_pooled("vision_features", vision_features)
        _check_pooled("text_features", text_features)
        if self.training:
            self.steps_done += 1
        weight = self.current_weight()
        if weight == 0.0:  # e.g. an eval call before any training step: nothing to compute
            return image_embeds.new_zeros((), dtype=torch.float32)
        options = self.config.function_kwargs()
        value = 0.5 * (
            structure_regularizer(vision_features, image_embeds, **options)
            + structure_regularizer(text_features, text_embeds, **options)
        )
        return weight * value
