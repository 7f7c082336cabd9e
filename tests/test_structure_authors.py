"""STRUCTURE's `authors_rkl` is the authors' computation, 1e-12 floor included: value and gradient equal a
reimplementation of their `structure_reg` (mean centring after L2 normalisation, cosine similarities over τ, row
softmax, matrix powers, `F.kl_div((P + eps).log(), M + eps, reduction="batchmean")`) to 1e-6, also where transition
probabilities fall below the floor; `exact_rkl` keeps the floor-free divergence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_align.functional.structure import structure_regularizer


def authors_structure(original, aligned, levels, tau, eps=1e-12, inverse=True):
    def prepared(x):
        x = F.normalize(x, p=2, dim=-1)
        return x - x.mean(dim=0, keepdim=True)

    original_sim, aligned_sim = (
        prepared(original) @ prepared(original).T / tau,
        prepared(aligned) @ prepared(aligned).T / tau,
    )
    total = 0.0
    for level in range(1, levels + 1):
        p_x = torch.matrix_power(F.softmax(original_sim, dim=-1), level)
        p_a = torch.matrix_power(F.softmax(aligned_sim, dim=-1), level)
        m = 0.5 * (p_x + p_a)
        js = 0.5 * (
            F.kl_div((p_a + eps).log(), m + eps, reduction="batchmean")
            + F.kl_div((p_x + eps).log(), m + eps, reduction="batchmean")
        )
        total = total + (js / level if inverse else js)
    return total / levels


def batch(seed: int, spread: float):
    g = torch.Generator().manual_seed(seed)
    # float32, as both computations run (the authors' with autocast off, hf_align's in float32)
    frozen = torch.randn(12, 7, generator=g) * spread
    aligned = torch.randn(12, 5, generator=g) * spread
    return frozen, aligned


@pytest.mark.parametrize(
    "tau, levels",
    [
        (0.5, 1),  # every probability far above the floor
        (0.05, 1),  # the authors' τ
        (0.05, 3),  # powers, inverse weighting
        (0.005, 1),  # extreme: most off-diagonal probabilities under 1e-12, where the floor matters
        (0.005, 2),
    ],
)
def test_authors_rkl_value_and_gradient_equal_the_authors_formula(tau, levels):
    frozen, aligned = batch(0, 1.0)
    ours_input = aligned.clone().requires_grad_(True)
    theirs_input = aligned.clone().requires_grad_(True)
    ours = structure_regularizer(frozen, ours_input, levels=levels, tau=tau, divergence="authors_rkl")
    theirs = authors_structure(frozen, theirs_input, levels, tau)
    ours.backward()
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    torch.testing.assert_close(ours_input.grad, theirs_input.grad, rtol=0, atol=1e-6)


def test_the_floor_changes_the_value_only_where_probabilities_underflow():
    frozen, aligned = batch(1, 1.0)
    for tau, differs in ((0.5, False), (0.005, True)):
        floored = structure_regularizer(frozen, aligned, tau=tau, divergence="authors_rkl").item()
        exact = structure_regularizer(frozen, aligned, tau=tau, divergence="exact_rkl").item()
        if differs:
            assert abs(floored - exact) > 1e-4 * abs(exact)
        else:
            assert floored == pytest.approx(exact, rel=1e-6)


def test_exact_rkl_is_the_floor_free_divergence_by_hand():
    frozen, aligned = batch(2, 1.0)
    frozen, aligned = frozen.double(), aligned.double()  # the reference in float64; hf_align computes in float32

    def log_p(x):
        x = F.normalize(x, dim=-1)
        x = x - x.mean(0, keepdim=True)
        return torch.log_softmax(x @ x.T / 0.05, dim=1)

    lp, lq = log_p(frozen), log_p(aligned)
    m = 0.5 * (lp.exp() + lq.exp())
    expected = (0.5 * (m * (m.log() - lq)).sum(1) + 0.5 * (m * (m.log() - lp)).sum(1)).mean()
    got = structure_regularizer(frozen, aligned, tau=0.05, divergence="exact_rkl")
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
