"""Mutual k-NN, linear CKA and unbiased CKA against hand computations, invariances and bad input."""

import math

import numpy as np
import pytest
import torch

import hf_align
from hf_align.functional.representation_similarity import knn_indices, resolve_k


def on_circle(degrees, radii=None):
    """Points at the given angles (degrees) on circles of the given radii: cosine neighbours = nearest angles."""
    angles = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    radii = np.ones_like(angles) if radii is None else np.asarray(radii, dtype=np.float64)
    return torch.tensor(np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None], dtype=torch.float32)


def random_orthogonal(d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


# ----------------------------------------------------------------------------------------- mutual k-NN
def test_mutual_knn_matches_hand_count():
    # a: angles 0, 10, 20, 90, 180 (radii vary: cosine neighbours ignore them). k = 2 nearest by angle:
    #   N_a(0) = {1, 2}  N_a(1) = {0, 2}  N_a(2) = {0, 1}  N_a(3) = {1, 2} (70, 80 < 90)  N_a(4) = {2, 3} (90, 160)
    a = on_circle([0, 10, 20, 90, 180], radii=[1.0, 3.0, 0.5, 2.0, 7.0])
    # b: angles 0, 100, 30, 60, 200:
    #   N_b(0) = {2, 3} (30, 60)  N_b(1) = {2, 3} (70, 40)  N_b(2) = {0, 3} (30, 30)  N_b(3) = {1, 2} (40, 30)
    #   N_b(4) = {1, 3} (100, 140)
    b = on_circle([0, 100, 30, 60, 200])
    # overlaps: {2}, {2}, {0}, {1, 2}, {3} -> 1 + 1 + 1 + 2 + 1 = 6 of 5 * 2
    assert hf_align.functional.mutual_knn(a, b, k=2) == pytest.approx(6 / 10)
    assert knn_indices(a, 2).sort(1).values.tolist() == [[1, 2], [0, 2], [0, 1], [1, 2], [2, 3]]
    # k = n - 1: every other sample is a neighbour in both sets
    assert hf_align.functional.mutual_knn(a, b, k=4) == pytest.approx(1.0)


def test_mutual_knn_identical_and_rotated_sets_score_one():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert hf_align.functional.mutual_knn(x, x, k=10) == 1.0
    assert hf_align.functional.mutual_knn(x, 2.5 * x @ random_orthogonal(16, 1), k="rice") == 1.0


def test_mutual_knn_independent_sets_near_chance():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, 32, generator=g), torch.randn(1000, 32, generator=g)
    # chance overlap is k / (n - 1) = 20 / 999
    assert hf_align.functional.mutual_knn(a, b, k="rice") == pytest.approx(20 / 999, abs=0.01)


def test_chunked_neighbour_search_equals_whole():
    x = torch.randn(37, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(knn_indices(x, 4, chunk_size=3), knn_indices(x, 4, chunk_size=1000))
    y = torch.randn(37, 7, generator=torch.Generator().manual_seed(4))
    assert hf_align.functional.mutual_knn(x, y, 4, chunk_size=5) == hf_align.functional.mutual_knn(x, y, 4)


def test_k_rules_in_exact_integer_arithmetic():
    assert resolve_k("rice", 5000) == 35  # ceil(2 * 17.0998)
    assert resolve_k("rice", 1000) == 20  # 2 * 10 exactly: float cube root would give 19.999...
    assert resolve_k("rice", 8) == 4
    assert resolve_k("sqrt", 100) == 10 and resolve_k("sqrt", 101) == 11
    assert resolve_k("sturges", 1024) == 11 and resolve_k("sturges", 1025) == 12
    assert resolve_k(7, 100) == 7


def test_mutual_knn_accepts_numpy_and_half_precision():
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    assert hf_align.functional.mutual_knn(x, torch.from_numpy(x).half(), k=5) == 1.0


# ----------------------------------------------------------------------------------------- CKA
# A is already centred; B has mean 3, centred B = (-2, -1, 0, 3).
A = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
B = torch.tensor([[1.0], [2.0], [3.0], [6.0]])


def test_cka_matches_hand_computation():
    # AᵀB_c = (1·-2 + -1·0, 1·-1 + -1·3) = (-2, -4) -> ‖·‖² = 20; AᵀA = 2·I -> ‖·‖_F = 2√2; B_cᵀB_c = 14
    # CKA = 20 / (2√2 · 14) = 5 / (7√2)
    assert hf_align.functional.cka(A, B) == pytest.approx(5 / (7 * math.sqrt(2)), rel=1e-12)
    # centring is part of the definition: a translated B gives the same value
    assert hf_align.functional.cka(A, B + 100.0) == pytest.approx(5 / (7 * math.sqrt(2)), rel=1e-9)


def song_unbiased_hsic(x, y):
    """Song et al. (2012) unbiased HSIC from Gram matrices with zeroed diagonals, term by term (n ≥ 4)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = x.shape[0]
    K, L = x @ x.T, y @ y.T
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    one = np.ones(n)
    trace_term = np.trace(K @ L)
    sums_term = (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
    cross_term = 2.0 / (n - 2) * (one @ K @ L @ one)
    return (trace_term + sums_term - cross_term) / (n * (n - 3))


def test_unbiased_cka_matches_hand_computation():
    # Feature-space form for centred features, n = 4 (n/(n-2) = 2, (n-1)(n-2) = 6):
    #   r_A = (1, 1, 1, 1), R_A = 4; r_B = (4, 1, 0, 9), R_B = 14
    #   AB: 20 - 2·(4 + 1 + 0 + 9) + 4·14/6 = 4/3
    #   AA: 8 - 2·4 + 16/6 = 8/3;   BB: 196 - 2·98 + 196/6 = 98/3
    #   unbiased CKA = (4/3) / sqrt(8/3 · 98/3) = (4/3) / (28/3) = 1/7
    assert hf_align.functional.unbiased_cka(A, B) == pytest.approx(1 / 7, rel=1e-12)
    # the same number from Song's Gram-matrix estimator (uncentred B: the estimator is translation invariant)
    by_gram = song_unbiased_hsic(A, B) / math.sqrt(song_unbiased_hsic(A, A) * song_unbiased_hsic(B, B))
    assert by_gram == pytest.approx(1 / 7, rel=1e-12)


def test_unbiased_cka_matches_song_estimator_on_random_data():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(9, 4, generator=g), torch.randn(9, 6, generator=g)
    expected = song_unbiased_hsic(x, y) / math.sqrt(song_unbiased_hsic(x, x) * song_unbiased_hsic(y, y))
    assert hf_align.functional.unbiased_cka(x, y) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("score", [hf_align.functional.cka, hf_align.functional.unbiased_cka])
def test_cka_invariant_to_orthogonal_maps_and_isotropic_scaling(score):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 10, generator=g)
    y = x[:, :6] @ torch.randn(6, 8, generator=g) + 0.5 * torch.randn(60, 8, generator=g)
    base = score(x, y)
    assert 0.2 < base < 1.0
    assert score(x @ random_orthogonal(10, 1) * 3.0, y * 0.01) == pytest.approx(base, rel=1e-6)
    assert score(x, x) == pytest.approx(1.0, rel=1e-12)
    assert score(y, y @ random_orthogonal(8, 2)) == pytest.approx(1.0, rel=1e-6)


def test_unbiased_cka_removes_small_sample_bias():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 100, generator=g), torch.randn(40, 100, generator=g)
    assert hf_align.functional.cka(a, b) > 0.5  # plain CKA of independent wide sets is far from 0
    assert abs(hf_align.functional.unbiased_cka(a, b)) < 0.05


# ----------------------------------------------------------------------------------------- module path
# ----------------------------------------------------------------------------------------- bad input
def test_fewer_samples_than_k_is_a_clear_error():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"k=5 neighbours need more than k samples .* only 5 were given"):
        hf_align.functional.mutual_knn(x, x, k=5)
    # rice rule for n = 3: ⌈2 · 1.442⌉ = 3 > n - 1
    with pytest.raises(ValueError, match=r"k=3 \(rule 'rice'\) neighbours .* only 3 were given: use k <= 2"):
        hf_align.functional.mutual_knn(x[:3], x[:3], k="rice")
    with pytest.raises(
        ValueError, match=r"k must be a positive int or one of \('rice', 'sqrt', 'sturges'\), got 'log'"
    ):
        hf_align.functional.mutual_knn(x, x, k="log")


@pytest.mark.parametrize(
    "score", [hf_align.functional.mutual_knn, hf_align.functional.cka, hf_align.functional.unbiased_cka]
)
def test_mismatched_sample_counts_are_rejected(score):
    with pytest.raises(ValueError, match=r"a has 6 rows and b has 5: row i of each must describe sample i"):
        score(torch.randn(6, 3), torch.randn(5, 3))


def test_other_bad_inputs():
    with pytest.raises(ValueError, match=r"a must be a 2-D \(n_samples, dim\) matrix, got shape \(4, 2, 3\)"):
        hf_align.functional.cka(torch.randn(4, 2, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="unbiased_cka needs at least 4 samples, got 3"):
        hf_align.functional.unbiased_cka(torch.randn(3, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="CKA is undefined: b has no variance across samples"):
        hf_align.functional.cka(torch.randn(5, 2), torch.ones(5, 3))
    with pytest.raises(ValueError, match="a contains NaN or infinite values"):
        hf_align.functional.cka(torch.tensor([[0.0], [float("nan")], [1.0]]), torch.randn(3, 1))
