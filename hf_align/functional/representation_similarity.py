"""Cross-modal representational similarity between two feature sets of the *same* samples.

Three scores, each taking `a` (n, d_a) and `b` (n, d_b) whose row i describes sample i in both sets (e.g. the image
and the caption of pair i at two encoder layers) and returning a Python float:

* `mutual_knn(a, b, k)`: mutual k-nearest-neighbour alignment (Huh et al., "The Platonic Representation Hypothesis";
  the layer-selection score of STRUCTURE). Rows are L2-normalised, neighbours are by cosine similarity, a sample is
  never its own neighbour; the score is the mean over samples of |N_a(i) ∩ N_b(i)| / k, in [0, 1].
  `k` is an int or a rule of n: `"rice"` = ⌈2·n^(1/3)⌉, `"sqrt"` = ⌈√n⌉, `"sturges"` = ⌈log2 n⌉ + 1.
* `cka(a, b)`: linear CKA (Kornblith et al. 2019) on column-centred features, `‖AᵀB‖²_F / (‖AᵀA‖_F ‖BᵀB‖_F)`.
* `unbiased_cka(a, b)`: linear CKA built on the unbiased HSIC estimator of Song et al. (2012) (Kornblith's
  `debiased=True`); it is not biased upwards for small n / wide features, and can be slightly negative.

CKA is invariant to an isotropic scale of a whole set, not to rescaling its rows one by one. Layer selection
(docs/methods.md §4) L2-normalises every row first, as the STRUCTURE authors' pipeline does; `normalize=True` gives
the same score here for two arrays.

Memory: nothing n × n is ever held. The neighbour search runs over row chunks (`chunk_size` rows against all n at a
time, default ≈ 32M scores per chunk) keeping only the (n, k) indices; CKA is computed in feature space (d × d
cross-products accumulated over row chunks in float64). 50k samples × 1024 dims fits comfortably on CPU, and
everything runs on the device the inputs live on (a GPU if they are CUDA tensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

K_RULES = ("rice", "sqrt", "sturges")
_CHUNK_ELEMENTS = 1 << 25  # ~32M scores (128 MB in float32) per neighbour-search chunk
_CKA_CHUNK_ROWS = 8192  # rows per float64 chunk when accumulating d × d cross-products

__all__ = ["K_RULES", "cka", "knn_indices", "mutual_knn", "mutual_knn_from_indices", "resolve_k", "unbiased_cka"]


# --------------------------------------------------------------------------- input checks
def as_matrix(x, name: str = "features") -> torch.Tensor:
    """A 2-D float tensor (n, d) from a tensor, NumPy array or nested list; half precisions are promoted to float32."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (n_samples, dim) matrix, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    elif x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x.detach()


def check_pair(a, b, what: str, min_samples: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two feature sets of the same samples; `b` is moved to `a`'s device."""
    a, b = as_matrix(a, "a"), as_matrix(b, "b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{what} compares two feature sets of the same samples, but a has {a.shape[0]} rows and b has "
            f"{b.shape[0]}: row i of each must describe sample i"
        )
    if a.shape[0] < min_samples:
        raise ValueError(f"{what} needs at least {min_samples} samples, got {a.shape[0]}")
    for name, x in (("a", a), ("b", b)):
        if not torch.isfinite(x).all():
            raise ValueError(f"{what}: {name} contains NaN or infinite values")
    return a, b.to(a.device)


def resolve_k(k: int | str, n: int) -> int:
    """Number of neighbours for `n` samples: an int, or the rule `rice` (⌈2·n^⅓⌉), `sqrt` (⌈√n⌉), `sturges`
    (⌈log2 n⌉ + 1). Computed in exact integer arithmetic (rice for 5000 is 35). Raises when k ∉ [1, n - 1]."""
    if isinstance(k, str):
        if k not in K_RULES:
            raise ValueError(f"k must be a positive int or one of {K_RULES}, got {k!r}")
        if n < 1:
            raise ValueError(f"cannot apply the {k!r} rule to {n} samples")
        if k == "rice":  # smallest integer k with k >= 2 n^(1/3), i.e. k^3 >= 8 n
            value = max(1, math.ceil(2 * n ** (1 / 3)))
            while (value - 1) ** 3 >= 8 * n:
                value -= 1
            while value**3 < 8 * n:
                value += 1
        elif k == "sqrt":
            value = math.isqrt(n - 1) + 1
        else:  # sturges: ceil(log2 n) + 1
            value = (n - 1).bit_length() + 1
        rule = f" (rule {k!r})"
    elif isinstance(k, (int, np.integer)) and not isinstance(k, bool):
        value, rule = int(k), ""
        if value < 1:
            raise ValueError(f"k must be at least 1, got {value}")
    else:
        raise ValueError(f"k must be a positive int or one of {K_RULES}, got {k!r}")
    if value > n - 1:
        raise ValueError(
            f"k={value}{rule} neighbours need more than k samples (a sample is not its own neighbour), "
            f"but only {n} were given: use k <= {n - 1} or more samples"
        )
    return value


# --------------------------------------------------------------------------- mutual k-NN
@torch.no_grad()
def knn_indices(x, k: int, chunk_size: int | None = None) -> torch.Tensor:
    """(n, k) indices of each row's k nearest other rows by cosine similarity, best first.

    The search runs over `chunk_size` query rows at a time (default: ~32M scores per chunk), so the n × n similarity
    matrix never exists. Ties are broken by `torch.topk`.
    """
    x = F.normalize(as_matrix(x), dim=1)
    n = x.shape[0]
    k = resolve_k(k, n)
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(n, 1))
    out = torch.empty(n, k, dtype=torch.long, device=x.device)
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        sims = x[start:stop] @ x.T
        rows = torch.arange(stop - start, device=x.device)
        sims[rows, rows + start] = float("-inf")  # a sample is not its own neighbour
        out[start:stop] = sims.topk(k, dim=1).indices
        del sims
    return out


def mutual_knn_from_indices(indices_a: torch.Tensor, indices_b: torch.Tensor) -> float:
    """Mean over samples of |N_a(i) ∩ N_b(i)| / k from two (n, k) neighbour-index tables (rows need not be sorted)."""
    if indices_a.shape != indices_b.shape:
        raise ValueError(f"neighbour tables differ in shape: {tuple(indices_a.shape)} vs {tuple(indices_b.shape)}")
    k = indices_a.shape[1]
    b_sorted = indices_b.to(indices_a.device).sort(dim=1).values
    position = torch.searchsorted(b_sorted, indices_a).clamp(max=k - 1)
    hits = b_sorted.gather(1, position) == indices_a  # neighbours within one row are distinct
    return float(hits.sum(dim=1).double().mean() / k)


def mutual_knn(a, b, k: int | str = "rice", chunk_size: int | None = None) -> float:
    """Mutual k-NN alignment of two feature sets of the same n samples, in [0, 1] (1 = identical neighbourhoods).

    Args:
        a: (n, d_a) tensor / array; row i is sample i. Rows are L2-normalised here.
        b: (n, d_b) tensor / array; row i is sample i. Rows are L2-normalised here.
        k: number of neighbours, or a rule of n (`"rice"`, `"sqrt"`, `"sturges"`); must satisfy 1 <= k <= n - 1.
        chunk_size: query rows per similarity chunk (memory knob; the result does not depend on it).
    """
    a, b = check_pair(a, b, "mutual_knn")
    k = resolve_k(k, a.shape[0])
    return mutual_knn_from_indices(knn_indices(a, k, chunk_size), knn_indices(b, k, chunk_size))


# --------------------------------------------------------------------------- CKA
@dataclass
class LinearKernelStats:
    """What linear (unbiased) CKA needs from one feature set, computed once (layer selection reuses it per pair).

    x: the features (n, d) as given; mean: their float64 column mean; row_sq: squared norms of the centred rows;
    self_hsic / self_hsic_unbiased: HSIC of the set with itself (up to the constant factor that cancels in CKA).
    """

    x: torch.Tensor
    mean: torch.Tensor
    row_sq: torch.Tensor
    self_hsic: float
    self_hsic_unbiased: float

    @property
    def n(self) -> int:
        return self.x.shape[0]

    def centred_chunks(self):
        for start in range(0, self.n, _CKA_CHUNK_ROWS):
            yield self.x[start : start + _CKA_CHUNK_ROWS].double() - self.mean


@torch.no_grad()
def linear_kernel_stats(x, name: str = "features") -> LinearKernelStats:
    x = as_matrix(x, name)
    mean = x.double().mean(dim=0)
    stats = LinearKernelStats(x, mean, torch.empty(0), 0.0, 0.0)
    stats.row_sq = torch.cat([(chunk * chunk).sum(dim=1) for chunk in stats.centred_chunks()])
    frob = _cross_frobenius_sq(stats, stats)
    stats.self_hsic = frob
    stats.self_hsic_unbiased = _debias(frob, stats, stats)
    return stats


def _cross_frobenius_sq(sa: LinearKernelStats, sb: LinearKernelStats) -> float:
    """‖A_cᵀ B_c‖²_F accumulated over row chunks in float64 (d_a × d_b memory, never n × n)."""
    product = None
    for ca, cb in zip(sa.centred_chunks(), sb.centred_chunks()):
        term = ca.T @ cb.to(ca.device)
        product = term if product is None else product + term
    return float((product * product).sum())


def _debias(frobenius_sq: float, sa: LinearKernelStats, sb: LinearKernelStats) -> float:
    """Song et al.'s unbiased HSIC × n(n-3) for centred linear kernels with zeroed diagonals:
    tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n-1)(n-2)) − 2/(n-2)·1ᵀK̃L̃1, which for centred features reduces to
    ‖AᵀB‖² − n/(n-2)·r_a·r_b + R_a·R_b/((n-1)(n-2)) (r: squared row norms, R their sum)."""
    n = sa.n
    if n < 4:
        return float("nan")
    rr = float((sa.row_sq * sb.row_sq.to(sa.row_sq.device)).sum())
    total = float(sa.row_sq.sum()) * float(sb.row_sq.sum())
    return frobenius_sq - n / (n - 2) * rr + total / ((n - 1) * (n - 2))


def cka_from_stats(sa: LinearKernelStats, sb: LinearKernelStats, unbiased: bool = False) -> float:
    frob = _cross_frobenius_sq(sa, sb)
    if unbiased:
        num, den_a, den_b = _debias(frob, sa, sb), sa.self_hsic_unbiased, sb.self_hsic_unbiased
    else:
        num, den_a, den_b = frob, sa.self_hsic, sb.self_hsic
    for name, den in (("a", den_a), ("b", den_b)):
        if not den > 0:
            raise ValueError(
                f"{'unbiased ' if unbiased else ''}CKA is undefined: {name} has no variance across samples "
                f"(its {'unbiased ' if unbiased else ''}HSIC with itself is {den:.3g})"
            )
    return num / math.sqrt(den_a * den_b)


def cka(a, b, normalize: bool = False) -> float:
    """Linear CKA of two feature sets of the same n samples (n >= 2), in [0, 1].

    `CKA = ‖A_cᵀB_c‖²_F / (‖A_cᵀA_c‖_F · ‖B_cᵀB_c‖_F)` with column-centred A_c, B_c; invariant to orthogonal
    transforms and isotropic scaling of either set. `normalize=True` L2-normalises every row first (then centres), as
    layer selection does: the score then ignores each sample's norm. Raises ValueError for a set that is constant
    across samples.
    """
    a, b = check_pair(a, b, "cka", min_samples=2)
    return cka_from_stats(*_stats_pair(a, b, normalize))


def unbiased_cka(a, b, normalize: bool = False) -> float:
    """Linear CKA from the unbiased HSIC estimator (Song et al. 2012; Kornblith et al.'s `debiased=True`), n >= 4.

    Not inflated for small n or wide features (plain CKA of two independent random sets is far above 0 when d ~ n;
    this one is ≈ 0). It can be slightly negative and is exactly 1 for identical sets. `normalize` as in `cka`.
    """
    a, b = check_pair(a, b, "unbiased_cka", min_samples=4)
    return cka_from_stats(*_stats_pair(a, b, normalize), unbiased=True)


def _stats_pair(a: torch.Tensor, b: torch.Tensor, normalize: bool) -> tuple[LinearKernelStats, LinearKernelStats]:
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize must be True or False, got {normalize!r}")
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    return linear_kernel_stats(a, "a"), linear_kernel_stats(b, "b")
