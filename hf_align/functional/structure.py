"""STRUCTURE regularisation (docs/methods.md §3): keep, in the aligned space, the neighbourhood structure each frozen
encoder had.

For one modality with frozen batch features X (B, d) and their aligned embeddings A = f(X) (B, D):

1. rows are L2-normalised, then (with `centering=True`) the batch mean is subtracted;
2. `P_X = softmax_row(X Xᵀ / τ)` (the diagonal is kept), likewise `P_A`; level l compares the l-th matrix powers
   `P_X^l`, `P_A^l` (random walks of l hops on the batch similarity graph). With `image_ids`, rows i ≠ j showing the
   same image (several captions of one image in the batch) get transition probability 0 to each other in both
   matrices, so both spaces compare the same neighbour sets;
3. the level divergence is the mean over rows of either the variant the authors' code computes
   (`divergence="authors_rkl"`, the default: ½ [KL(M‖P_A) + KL(M‖P_X)], M = ½(P_X + P_A), "reverse" KLs from the
   mixture, not bounded by ln 2; λ = 10 was tuned on it), computed as their code does it, with a floor ε = 1e-12
   added to every probability: Σ_j (m + ε)(log(m + ε) − log(q + ε)); or the same divergence without the floor,
   from exact log-probabilities (`divergence="exact_rkl"`: the two differ only where a transition probability falls
   below about 1e-12, and there the exact one keeps the gradient the floor flattens); or the Jensen–Shannon
   divergence (`divergence="js"`, ½ KL(P_X‖M) + ½ KL(P_A‖M), natural log, in [0, ln 2]);
4. `R_S = (1/L) Σ_l w_l · relu(D_l − margin)` with `w_l = 1/l` (`weighting="inverse"`, the default, as the authors'
   configurations with L > 1) or `1` (`"none"`); the two agree at L = 1.

`levels`: an int L means the L levels 1, 2, …, L; a list of ints names the matrix powers explicitly (e.g. `[1, 3]`),
and 1/L then divides by its length. `STRUCTURE_PRESETS` holds the authors' four configurations (`L1`, `L2`, `L3`,
`L5`), selected with `preset="L3"` (`structure_preset="L3"`).

The regulariser that adds it to training (`"structure"`, λ and its warm-up) is `hf_align.regularizers.structure`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .losses import same_image_mask

WEIGHTINGS = ("none", "inverse")
DIVERGENCES = ("authors_rkl", "exact_rkl", "js")
AUTHORS_EPS = 1e-12  # the floor the authors' structure_reg adds to every probability before its logs


def check_levels(levels) -> list[int]:
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


def check_options(tau, weighting, margin, divergence) -> None:
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


def check_pooled(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2:
        kind = "token features (B, T, d)" if x.dim() == 3 else f"a tensor of shape {tuple(x.shape)}"
        raise ValueError(
            f"STRUCTURE regularisation needs pooled features, one vector per sample (B, d); {name} is {kind}. "
            "Use it with a pooled method (cls/mean pooling), not a token method"
        )


def _log_transitions(
    x: torch.Tensor, tau: float, centering: bool, powers: list[int], same: torch.Tensor | None
) -> dict[int, torch.Tensor]:
    """log P^l for every requested power l, P = softmax_row(x̂ x̂ᵀ / τ): (B, B) each, float32.

    `same` (B, B) bool marks the pairs that get transition probability 0 (log P = −∞ at level 1). Level 1 comes
    straight from log_softmax (exact even where P underflows); higher powers take the log of the matrix power, clamped
    at the smallest normal float so a zero entry gives a large finite log rather than −∞.
    """
    x = F.normalize(x.float(), dim=1)
    if centering:
        x = x - x.mean(dim=0, keepdim=True)
    logits = x @ x.T / tau
    if same is not None:
        logits = logits.masked_fill(same, float("-inf"))  # the diagonal is never masked: every row stays finite
    log_p = torch.log_softmax(logits, dim=1)
    out = {1: log_p} if 1 in powers else {}
    if max(powers) > 1:
        p = power = log_p.exp()
        for level in range(2, max(powers) + 1):
            power = power @ p
            if level in powers:
                out[level] = power.clamp_min(torch.finfo(power.dtype).tiny).log()
    return out


def _row_divergence(
    log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, ignore: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over rows of JS(p, q) or ½[KL(m‖q) + KL(m‖p)], m = ½(p + q) (`exact_rkl`; `authors_rkl` the same with
    `AUTHORS_EPS` added to m, p and q before the logs, as the authors' code); inputs are (B, B) log-probabilities.

    `ignore` (B, B) bool marks entries where both p and q are exactly 0 (log −∞): they contribute 0. They are set to
    log 1 in both first, which makes every term there exactly 0 (p = q = m) and keeps −∞ − (−∞) = NaN out of the
    values and the gradients.
    """
    if ignore is not None:
        log_p, log_q = log_p.masked_fill(ignore, 0.0), log_q.masked_fill(ignore, 0.0)
    p, q = log_p.exp(), log_q.exp()
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    if divergence == "js":
        per_row = 0.5 * (p * (log_p - log_m)).sum(1) + 0.5 * (q * (log_q - log_m)).sum(1)
    elif divergence == "authors_rkl":
        m = 0.5 * (p + q) + AUTHORS_EPS
        per_row = 0.5 * (m * (m.log() - (q + AUTHORS_EPS).log())).sum(1) + 0.5 * (
            m * (m.log() - (p + AUTHORS_EPS).log())
        ).sum(1)
    else:
        m = log_m.exp()
        per_row = 0.5 * (m * (log_m - log_q)).sum(1) + 0.5 * (m * (log_m - log_p)).sum(1)
    return per_row.mean()


def structure_regularizer(
    frozen: torch.Tensor,
    aligned: torch.Tensor,
    levels: int | Sequence[int] = 1,
    tau: float = 0.05,
    weighting: str = "inverse",
    margin: float = 0.0,
    divergence: str = "authors_rkl",
    centering: bool = True,
    image_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """R_S for one modality: how much the aligned batch geometry departs from the frozen one (a scalar, >= 0).

    Args:
        frozen: (B, d) frozen features of the batch (no gradient flows into them).
        aligned: (B, D) aligned embeddings of the same B samples (any D; normalised here).
        levels: number of levels L (powers 1..L) or an explicit list of powers.
        tau: softmax temperature of the transition matrices.
        weighting: `inverse` (w_l = 1/l, the default) or `none` (w_l = 1).
        margin: divergence below which a level costs nothing (`relu(D_l − margin)`).
        divergence: `authors_rkl` (½[KL(M‖P_A) + KL(M‖P_X)] with the authors' 1e-12 floor, the default),
            `exact_rkl` (the same without the floor) or `js` (Jensen–Shannon).
        centering: subtract the batch mean after L2 normalisation.
        image_ids: optional (B,) image id of each sample; samples i ≠ j with the same id get transition probability 0
            to each other in both P_X and P_A. `None`: every pair is a neighbour candidate.

    Returns 0 (up to rounding) when `aligned` equals `frozen` up to a rotation and an isotropic scale.
    """
    powers = check_levels(levels)
    check_options(tau, weighting, margin, divergence)
    check_pooled("frozen", frozen)
    check_pooled("aligned", aligned)
    if frozen.shape[0] != aligned.shape[0]:
        raise ValueError(
            f"frozen and aligned must hold the same samples: got {frozen.shape[0]} and {aligned.shape[0]} rows"
        )
    if frozen.shape[0] < 2:
        raise ValueError(f"STRUCTURE needs a batch of at least 2 samples, got {frozen.shape[0]}")
    same = None if image_ids is None else same_image_mask(image_ids.to(aligned.device), aligned.shape[0])
    with torch.no_grad():
        log_frozen = _log_transitions(frozen, tau, centering, powers, None if same is None else same.to(frozen.device))
    log_aligned = _log_transitions(aligned, tau, centering, powers, same)
    total = aligned.new_zeros((), dtype=torch.float32)
    for level in powers:
        weight = 1.0 if weighting == "none" else 1.0 / level
        # Only level 1 holds exact zeros at the masked pairs; powers reach them through other samples.
        ignore = same if level == 1 else None
        value = _row_divergence(log_frozen[level].to(aligned.device), log_aligned[level], divergence, ignore)
        total = total + weight * torch.relu(value - margin)
    return total / len(powers)
