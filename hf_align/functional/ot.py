"""Entropic optimal transport in log space: SwAV's equal-partition Sinkhorn–Knopp and a general transport plan.

Both functions work on `exp(·/ε)` only through `logsumexp`, so they stay finite for small ε (SwAV's ε = 0.05 on
cosine scores already overflows nothing, but ε = 0.01 on distances in the hundreds would in probability space), and
both compute in fp32 (fp64 if given fp64) whatever the input dtype, so bf16 scores are safe.
"""

from __future__ import annotations

import math

import torch

__all__ = ["log_sinkhorn", "sinkhorn"]


def _check_epsilon_iters(epsilon: float, n_iters: int) -> None:
    # Not hf_align.model.configuration's checks: this module needs torch only, so a distributed worker (and its test)
    # can load it without importing transformers.
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon <= 0:
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
        raise ValueError(f"n_iters must be a positive int, got {n_iters!r}")


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def in_distributed_group() -> bool:
    """True inside a torch.distributed group of several processes (the codebook method uses it too)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _global_logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`logsumexp` over `dim` of the tensor formed by concatenating every process's `x` along `dim`."""
    if not in_distributed_group():
        return torch.logsumexp(x, dim=dim, keepdim=True)
    dist = torch.distributed
    peak = x.amax(dim=dim, keepdim=True)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # an all -inf slice stays -inf below
    total = torch.exp(x - peak).sum(dim=dim, keepdim=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return peak + torch.log(total)


def _global_count(n: int, device: torch.device) -> int:
    if not in_distributed_group():
        return n
    count = torch.tensor([n], device=device, dtype=torch.long)
    torch.distributed.all_reduce(count)
    return int(count.item())


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, n_iters: int = 3) -> torch.Tensor:
    """Equal-partition soft assignments of n samples to K codes (SwAV's Sinkhorn–Knopp), in log space.

    Solves, approximately, `max_Q <Q, scores> + ε H(Q)` over the transportation polytope whose rows sum to 1 (each
    sample is fully assigned) and whose columns sum to n/K (every code gets the same share of the batch), by
    alternately normalising columns and rows of `Q = exp(scores / ε)`.

    Args:
        scores: (n, K) sample-to-code scores (SwAV: cosines to normalised prototypes). Any float dtype; the
            computation runs in fp32 (fp64 for fp64 input) and the result is returned in that dtype.
        epsilon: entropic regularisation (> 0); smaller gives harder assignments. SwAV uses 0.05.
        n_iters: number of (column, row) normalisation rounds. SwAV uses 3, which does **not** reach the column
            marginals exactly: because each round ends with the row normalisation, rows always sum to 1 exactly (up
            to rounding), while columns only approach n/K as `n_iters` grows (tens of iterations for 1e-4).

    Returns:
        Q: (n, K), no gradient. Rows sum to 1, columns to ≈ n/K.

    Under `torch.distributed`, `scores` holds this process's rows; the column marginals (and the global n) are
    all-reduced so the equal partition holds over the union of all processes' batches, as in SwAV.
    """
    _check_epsilon_iters(epsilon, n_iters)
    if scores.dim() != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty (n, K) matrix, got shape {tuple(scores.shape)}")
    log_q = scores.detach().to(_work_dtype(scores)) / epsilon
    n_codes = log_q.shape[1]
    n_total = _global_count(log_q.shape[0], log_q.device)
    log_col = -math.log(n_codes)  # column target 1/K of the mass ...
    log_row = -math.log(n_total)  # ... row target 1/n
    for _ in range(n_iters):
        log_q = log_q - _global_logsumexp(log_q, dim=0) + log_col
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) + log_row
    return torch.exp(log_q + math.log(n_total))


def log_sinkhorn(
    cost: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    epsilon: float = 0.05,
    n_iters: int = 100,
) -> torch.Tensor:
    """Entropic optimal transport plan between two discrete measures, Sinkhorn in log space (batched).

    Solves `min_P <P, C> − ε H(P)` subject to `P 1 = a`, `Pᵀ 1 = b` with the log-domain updates of the dual
    potentials `f = ε log a − ε LSE_j((g_j − C_ij)/ε)`, `g = ε log b − ε LSE_i((f_i − C_ij)/ε)`. It is the same
    problem as POT's `ot.sinkhorn(a, b, C, reg=ε)`; the plan converges to the same matrix.

    Args:
        cost: (..., n, m) cost matrices; any leading dims are a batch of independent problems.
        a: (..., n) or (n,) source weights (non-negative, summing to the same total as `b`); default uniform 1/n.
        b: (..., m) or (m,) target weights; default uniform 1/m.
        epsilon: entropic regularisation (> 0), in the units of `cost`.
        n_iters: Sinkhorn rounds. The last update is `g`, so the column marginals `b` hold exactly and the row
            marginals `a` up to the convergence error.

    Returns:
        P: (..., n, m) transport plan, in fp32 (fp64 for fp64 cost). Differentiable with respect to `cost`
        (autograd through the iterations); `(P * cost).sum((-2, -1))` is the entropic Wasserstein cost.
    """
    _check_epsilon_iters(epsilon, n_iters)
    if cost.dim() < 2 or cost.shape[-1] == 0 or cost.shape[-2] == 0:
        raise ValueError(f"cost must have shape (..., n, m) with n, m >= 1, got {tuple(cost.shape)}")
    dtype = _work_dtype(cost)
    cost = cost.to(dtype)
    n, m = cost.shape[-2:]
    log_a = _log_weights("a", a, n, cost)
    log_b = _log_weights("b", b, m, cost)
    scaled = -cost / epsilon  # (..., n, m)
    g = torch.zeros(cost.shape[:-2] + (m,), dtype=dtype, device=cost.device)  # dual potentials divided by ε
    for _ in range(n_iters):
        f = log_a - torch.logsumexp(scaled + g.unsqueeze(-2), dim=-1)
        g = log_b - torch.logsumexp(scaled + f.unsqueeze(-1), dim=-2)
    return torch.exp(scaled + f.unsqueeze(-1) + g.unsqueeze(-2))


def _log_weights(name: str, weights: torch.Tensor | None, size: int, cost: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return torch.full((size,), -math.log(size), dtype=cost.dtype, device=cost.device)
    weights = torch.as_tensor(weights, device=cost.device).to(cost.dtype)
    if weights.dim() == 0 or weights.shape[-1] != size:
        raise ValueError(
            f"{name} must have shape (..., {size}) to match cost {tuple(cost.shape)}, got {tuple(weights.shape)}"
        )
    if (weights < 0).any():
        raise ValueError(f"{name} must be non-negative")
    return torch.log(weights)
