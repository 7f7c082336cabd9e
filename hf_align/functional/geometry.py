"""Geometry of two embedding sets: the modality gap, Wasserstein-2 distances, alignment and uniformity.

Every function takes two sets of row vectors of the same width, as torch tensors or numpy arrays, and returns plain
Python floats, so it applies equally to raw encoder features (before alignment, when both encoders happen to have the
same width) and to an aligner's embeddings (after alignment). See docs/methods.md §8 (Xu & Leiva).

* `modality_gap`: distance between the centroids of the L2-normalised rows (Liang et al., "Mind the Gap").
* `gaussian_w2`: W2 between Gaussians fitted to each set (closed form; the Fréchet distance behind FID).
* `sample_w2`: exact W2 between the two empirical measures (uniform weights), by linear programming.
* `alignment_uniformity`: Wang & Isola's alignment (matched pairs) and uniformity (each set) losses.
* `geometry_report`: all of the above for one pair of sets, plus matched-vs-random pair similarities (what
  `hf-align analyze` writes, before and after alignment).

Computation is in float64 numpy; nothing here needs a GPU.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["alignment_uniformity", "gaussian_w2", "geometry_report", "modality_gap", "pair_similarities", "sample_w2"]


# ---------------------------------------------------------------------------------------------- helpers
def _as_matrix(name: str, x: Any) -> np.ndarray:
    """Rows as a float64 (n, d) array; torch tensors (any device / dtype, with or without grad) are accepted."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, d) set of row vectors, got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {x.shape})")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return x


def _pair(a: Any, b: Any, names: tuple[str, str] = ("a", "b"), same_n: bool = False) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_matrix(names[0], a), _as_matrix(names[1], b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same width to be compared, got {a.shape[1]} and {b.shape[1]} "
            "(raw features of two encoders usually differ in width: compare them after alignment)"
        )
    if same_n and a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{names[0]} and {names[1]} must hold matched pairs (same number of rows), "
            f"got {a.shape[0]} and {b.shape[0]}"
        )
    return a, b


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("cannot L2-normalise a zero row")
    return x / norms


def _subsample(x: np.ndarray, max_samples: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_samples is None or x.shape[0] <= max_samples:
        return x
    return x[np.sort(rng.choice(x.shape[0], size=max_samples, replace=False))]


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


# ---------------------------------------------------------------------------------------------- public functions
def modality_gap(image_embeds: Any, text_embeds: Any) -> float:
    """Modality gap: `‖mean(norm(x)) − mean(norm(y))‖₂`, the distance between the centroids of the L2-normalised
    image and text embeddings (Liang et al. 2022; CLIP ViT-B/32 on COCO ≈ 0.82).

    Rows are normalised first, so the value lies in [0, 2]; it is 0 when both sets have the same centroid on the
    sphere (e.g. identical distributions) whatever their widths' scale. The two sets need not be paired or of equal
    size, only of equal width.
    """
    x, y = _pair(image_embeds, text_embeds, ("image_embeds", "text_embeds"))
    return float(np.linalg.norm(_normalise_rows(x).mean(0) - _normalise_rows(y).mean(0)))


def gaussian_w2(a: Any, b: Any, normalize: bool = False) -> float:
    """Wasserstein-2 distance between the Gaussians fitted to two sets of rows (the Fréchet distance).

    `W2² = ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2})`, with unbiased (n − 1) covariances as
    in FID. The matrix square roots come from symmetric eigen-decompositions in float64 (negative eigenvalues from
    rounding are clipped to 0), which is stabler than a general `sqrtm`. Returns W2, not W2² (FID reports W2²).
    Equal covariances reduce it to the centroid distance `‖μ_a − μ_b‖`.

    Args:
        a: (n_a, d) set. It needs at least 2 rows for a covariance.
        b: (n_b, d) set; its size may differ from `a`'s. It needs at least 2 rows for a covariance.
        normalize: L2-normalise the rows first (compare directions only, like `modality_gap`).
    """
    a, b = _pair(a, b)
    if min(a.shape[0], b.shape[0]) < 2:
        raise ValueError("gaussian_w2 needs at least 2 rows per set to estimate a covariance")
    if normalize:
        a, b = _normalise_rows(a), _normalise_rows(b)
    mean_term = float(np.sum((a.mean(0) - b.mean(0)) ** 2))
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _psd_sqrt(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_term = float(np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.sqrt(np.clip(cross, 0.0, None)).sum())
    return math.sqrt(max(mean_term + trace_term, 0.0))


def sample_w2(a: Any, b: Any, normalize: bool = False, max_samples: int | None = None, seed: int = 0) -> float:
    """Exact Wasserstein-2 distance between two empirical measures with uniform weights (no entropic blur).

    Solves `min_P Σ P_ij ‖a_i − b_j‖²` over couplings of `1/n_a` and `1/n_b` and returns `sqrt` of the optimum
    (W2, not W2²), as POT's `sqrt(ot.emd2(a_w, b_w, ot.dist(a, b)))` does. Equal sizes: an optimal coupling of
    two uniform measures of n points is a permutation (Birkhoff), so the assignment problem solves it exactly
    (`scipy.optimize.linear_sum_assignment`, O(n³)). Unequal sizes: the transportation LP, solved by HiGHS
    (`scipy.optimize.linprog`) — exact, but with n_a·n_b variables keep the sets to a few hundred rows, or use
    `max_samples`.

    Args:
        a: (n_a, d) set.
        b: (n_b, d) set of the same width.
        normalize: L2-normalise rows first.
        max_samples: random subset of at most this many rows per set (reproducible with `seed`); `None` uses all
            rows. Sets of equal size keep the same row indices (matched pairs stay matched). W2 on a subsample is a
            (biased upwards) estimate of the population distance.
    """
    a, b = _pair(a, b)
    rng = np.random.default_rng(seed)
    if a.shape[0] == b.shape[0] and max_samples is not None and a.shape[0] > max_samples:
        keep = np.sort(rng.choice(a.shape[0], size=max_samples, replace=False))  # same rows: pairs stay pairs
        a, b = a[keep], b[keep]
    else:
        a, b = _subsample(a, max_samples, rng), _subsample(b, max_samples, rng)
    if normalize:
        a, b = _normalise_rows(a), _normalise_rows(b)
    cost = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    cost = np.clip(cost, 0.0, None)
    n, m = cost.shape
    if n == m:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(cost)
        value = cost[rows, cols].mean()
    else:
        value = _transport_lp(cost)
    return math.sqrt(max(float(value), 0.0))


def _transport_lp(cost: np.ndarray) -> float:
    """Optimal value of the transportation problem between uniform weights, as a sparse LP for HiGHS."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix, vstack

    n, m = cost.shape
    index = np.arange(n * m)
    rows_sum = coo_matrix((np.ones(n * m), (index // m, index)), shape=(n, n * m))
    cols_sum = coo_matrix((np.ones(n * m), (index % m, index)), shape=(m, n * m))
    # One equality is redundant (both sides sum to 1); HiGHS copes with that.
    result = linprog(
        cost.ravel(),
        A_eq=vstack([rows_sum, cols_sum]).tocsr(),
        b_eq=np.concatenate([np.full(n, 1.0 / n), np.full(m, 1.0 / m)]),
        bounds=(0, None),
        method="highs",
    )
    if not result.success:  # pragma: no cover - a feasible bounded LP; only numerical trouble lands here
        raise RuntimeError(f"exact OT (transportation LP) failed: {result.message}")
    return float(result.fun)


def alignment_uniformity(image_embeds: Any, text_embeds: Any, alpha: float = 2, t: float = 2) -> dict[str, float]:
    """Wang & Isola (2020) alignment and uniformity of matched image–text pairs (rows L2-normalised first).

    * `alignment = E_i ‖x_i − y_i‖^α` over the matched pairs (row i of each set): lower = positives closer.
    * `uniformity_image = log E_{i≠j} exp(−t ‖x_i − x_j‖²)` over distinct pairs of one set (as their `torch.pdist`
      reference code); lower = more uniform on the sphere. Same for `uniformity_text`; `uniformity` is their mean.

    Needs the same number of rows in both sets (row i of one matches row i of the other) and at least 2 rows.
    """
    if alpha <= 0 or t <= 0:
        raise ValueError(f"alpha and t must be > 0, got alpha={alpha!r}, t={t!r}")
    x, y = _pair(image_embeds, text_embeds, ("image_embeds", "text_embeds"), same_n=True)
    if x.shape[0] < 2:
        raise ValueError("alignment_uniformity needs at least 2 pairs (uniformity is over distinct pairs)")
    x, y = _normalise_rows(x), _normalise_rows(y)
    alignment = float(np.mean(np.linalg.norm(x - y, axis=1) ** alpha))
    return {
        "alignment": alignment,
        "uniformity_image": _uniformity(x, t),
        "uniformity_text": _uniformity(y, t),
        "uniformity": (_uniformity(x, t) + _uniformity(y, t)) / 2,
    }


def _uniformity(x: np.ndarray, t: float, block: int = 2048) -> float:
    """`log mean_{i<j} exp(−t‖x_i − x_j‖²)` in blocks of rows (memory O(block · n)), via a stable log-sum-exp."""
    n = x.shape[0]
    pieces = []
    for start in range(0, n, block):
        chunk = x[start : start + block]
        sq = np.clip(2.0 - 2.0 * chunk @ x.T, 0.0, None)  # unit rows: ‖a − b‖² = 2 − 2 a·b
        upper = np.arange(start, start + chunk.shape[0])[:, None] < np.arange(n)[None, :]
        pieces.append(-t * sq[upper])
    values = np.concatenate(pieces)
    peak = values.max()
    return float(peak + np.log(np.exp(values - peak).mean()))


def pair_similarities(
    image_embeds: Any, text_embeds: Any, score_pairs=None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the matched pairs (row i with row i) and of random pairs (row i with a random other row).

    `score_pairs(x, y) -> (n,)` scores matched rows of two torch tensors (a similarity head's `score_pairs`); default
    cosine. Random pairs pair each image with the text of a random permutation that moves every row (a cyclic
    shift of a shuffled order), so no random pair is a matched one.
    """
    import torch

    x, y = _pair(image_embeds, text_embeds, ("image_embeds", "text_embeds"), same_n=True)
    n = x.shape[0]
    if n < 2:
        raise ValueError("pair_similarities needs at least 2 pairs")
    order = np.random.default_rng(seed).permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, 1)  # a derangement: partner[i] != i
    if score_pairs is None:
        xn, yn = _normalise_rows(x), _normalise_rows(y)
        return (xn * yn).sum(1), (xn * yn[partner]).sum(1)
    tx, ty = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    with torch.no_grad():
        matched = score_pairs(tx, ty).double().cpu().numpy()
        shuffled = score_pairs(tx, ty[torch.as_tensor(partner)]).double().cpu().numpy()
    return matched, shuffled


def geometry_report(
    image_embeds: Any,
    text_embeds: Any,
    score_pairs=None,
    max_samples: int | None = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every geometry measure of this module for one set of matched pairs, as a JSON-ready dict.

    Distances (`gaussian_w2`, `sample_w2`) are computed on L2-normalised rows, like the modality gap, so raw
    features (arbitrary scale) and aligned embeddings (unit norm) are on the same footing. `sample_w2` uses at most
    `max_samples` rows per set (exact OT is O(n³)). `pair_similarity` summarises `pair_similarities` (scored with
    `score_pairs`, default cosine): the mean and std of matched and random pairs, and the fraction of images whose
    matched text beats its random partner.
    """
    x, y = _pair(image_embeds, text_embeds, ("image_embeds", "text_embeds"), same_n=True)
    matched, shuffled = pair_similarities(x, y, score_pairs, seed)
    return {
        "n_pairs": int(x.shape[0]),
        "dim": int(x.shape[1]),
        "modality_gap": modality_gap(x, y),
        "gaussian_w2": gaussian_w2(x, y, normalize=True),
        "sample_w2": sample_w2(x, y, normalize=True, max_samples=max_samples, seed=seed),
        "sample_w2_rows": int(min(x.shape[0], max_samples or x.shape[0])),
        **alignment_uniformity(x, y),
        "pair_similarity": {
            "matched_mean": float(matched.mean()),
            "matched_std": float(matched.std()),
            "random_mean": float(shuffled.mean()),
            "random_std": float(shuffled.std()),
            "matched_beats_random": float((matched > shuffled).mean()),
        },
    }
