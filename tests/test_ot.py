"""hf_align.functional.ot: equal-partition Sinkhorn (SwAV) and the general log-domain transport plan, against POT and a
plain probability-space implementation."""

import os
import subprocess
import sys

import numpy as np
import ot as pot
import pytest
import torch
import torch.nn.functional as F

import hf_align
from hf_align.functional.ot import log_sinkhorn, sinkhorn


def cosine_scores(n, k, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=1) @ F.normalize(torch.randn(k, dim, generator=g), dim=1).T


def swav_reference(scores, epsilon, n_iters):
    """SwAV's `distributed_sinkhorn` (single process), verbatim in probability space, in fp64."""
    q = torch.exp(scores.double() / epsilon).t()  # K x B
    n, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(n_iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    q *= n
    return q.t()


def test_public_name_is_ot_sinkhorn():
    assert hf_align.functional.sinkhorn is sinkhorn


@pytest.mark.parametrize("n,k", [(64, 10), (8, 32)])
def test_sinkhorn_marginals_to_1e4_with_enough_iterations(n, k):
    q = sinkhorn(cosine_scores(n, k), epsilon=0.05, n_iters=300)
    assert q.shape == (n, k) and q.dtype == torch.float32 and (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(n), atol=1e-4, rtol=0)
    torch.testing.assert_close(q.sum(0), torch.full((k,), n / k), atol=1e-4, rtol=0)


def test_three_iterations_give_exact_rows_but_approximate_columns():
    # SwAV's setting: each round ends with the row normalisation, so only rows are exact.
    scores = cosine_scores(64, 10)
    q = sinkhorn(scores, epsilon=0.05, n_iters=3)
    torch.testing.assert_close(q.sum(1), torch.ones(64), atol=1e-5, rtol=0)
    assert (q.sum(0) - 6.4).abs().max() > 1e-2


@pytest.mark.parametrize("n_iters", [1, 3, 10])
def test_sinkhorn_matches_swav_probability_space(n_iters):
    scores = cosine_scores(48, 12, seed=1)
    q = sinkhorn(scores, epsilon=0.05, n_iters=n_iters)
    torch.testing.assert_close(q.double(), swav_reference(scores, 0.05, n_iters), atol=1e-5, rtol=1e-4)


def test_sinkhorn_matches_pot_at_convergence():
    # Equal partition = OT between uniform 1/n over samples and uniform 1/K over codes, cost -scores, reg ε; Q = n P.
    scores = cosine_scores(40, 7, seed=2).double()
    n, k = scores.shape
    plan = pot.sinkhorn(np.full(n, 1 / n), np.full(k, 1 / k), -scores.numpy(), 0.05, numItermax=10000, stopThr=1e-13)
    q = sinkhorn(scores, epsilon=0.05, n_iters=500)
    assert q.dtype == torch.float64
    np.testing.assert_allclose(q.numpy(), n * plan, atol=1e-8)


def test_sinkhorn_small_epsilon_and_bf16_stay_finite_in_fp32():
    scores = cosine_scores(32, 8, seed=3) * 50  # exp(50 / 1e-3) overflows any float in probability space
    assert not torch.isfinite(torch.exp(scores / 1e-3)).all()
    q = sinkhorn(scores, epsilon=1e-3, n_iters=50)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(32), atol=1e-5, rtol=0)
    low = cosine_scores(32, 8, seed=3).bfloat16()
    q_bf16 = sinkhorn(low, epsilon=0.05, n_iters=3)
    assert q_bf16.dtype == torch.float32
    torch.testing.assert_close(q_bf16, sinkhorn(low.float(), epsilon=0.05, n_iters=3))


def test_sinkhorn_has_no_gradient():
    scores = cosine_scores(16, 4).requires_grad_(True)
    assert not sinkhorn(scores).requires_grad


@pytest.mark.parametrize("epsilon", [0, -0.1, float("nan"), float("inf")])
def test_sinkhorn_rejects_bad_epsilon(epsilon):
    with pytest.raises(ValueError, match=r"epsilon must be a finite number > 0, got"):
        sinkhorn(cosine_scores(4, 2), epsilon=epsilon)
    with pytest.raises(ValueError, match=r"epsilon must be a finite number > 0, got"):
        log_sinkhorn(torch.rand(3, 3), epsilon=epsilon)


def test_sinkhorn_rejects_bad_iterations_and_shapes():
    with pytest.raises(ValueError, match=r"n_iters must be a positive int, got 0"):
        sinkhorn(cosine_scores(4, 2), n_iters=0)
    with pytest.raises(ValueError, match=r"scores must be a non-empty \(n, K\) matrix, got shape \(4,\)"):
        sinkhorn(torch.rand(4))
    with pytest.raises(ValueError, match=r"cost must have shape \(\.\.\., n, m\)"):
        log_sinkhorn(torch.rand(4))
    with pytest.raises(ValueError, match=r"a must have shape \(\.\.\., 3\) to match cost"):
        log_sinkhorn(torch.rand(3, 5), a=torch.full((4,), 0.25))
    with pytest.raises(ValueError, match=r"b must be non-negative"):
        log_sinkhorn(torch.rand(3, 2), b=torch.tensor([1.5, -0.5]))


def test_log_sinkhorn_matches_pot_with_uneven_marginals():
    g = torch.Generator().manual_seed(4)
    cost = torch.rand(9, 6, generator=g, dtype=torch.float64)
    a = torch.rand(9, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    a, b = a / a.sum(), b / b.sum()
    reference = pot.sinkhorn(a.numpy(), b.numpy(), cost.numpy(), 0.1, numItermax=10000, stopThr=1e-14)
    plan = log_sinkhorn(cost, a, b, epsilon=0.1, n_iters=1000)
    np.testing.assert_allclose(plan.numpy(), reference, atol=1e-10)
    torch.testing.assert_close(plan.sum(-1), a)
    torch.testing.assert_close(plan.sum(-2), b)


def test_log_sinkhorn_is_batched_and_differentiable():
    g = torch.Generator().manual_seed(5)
    cost = torch.rand(3, 5, 4, generator=g).requires_grad_(True)
    b = torch.softmax(torch.randn(3, 4, generator=g), dim=-1)  # a batch of target measures, uniform sources
    plans = log_sinkhorn(cost, b=b, epsilon=0.05, n_iters=200)
    for i in range(3):
        torch.testing.assert_close(plans[i], log_sinkhorn(cost[i], b=b[i], epsilon=0.05, n_iters=200))
        torch.testing.assert_close(plans[i].sum(-1), torch.full((5,), 0.2), atol=1e-4, rtol=0)
    # Small ε on a cost in the hundreds: exp(-C/ε) underflows to 0 in probability space; the log domain does not.
    big = log_sinkhorn(cost.detach() * 300, epsilon=0.01, n_iters=50)
    assert torch.isfinite(big).all()
    # The last update fits the columns; fp32 potentials of size C/ε = 3e4 leave ~1e-4 of rounding.
    torch.testing.assert_close(big.sum(-2), torch.full((3, 4), 0.25), atol=1e-3, rtol=0)
    (plans * cost).sum().backward()
    assert cost.grad is not None and torch.isfinite(cost.grad).all() and cost.grad.abs().sum() > 0


# Each rank is a fresh interpreter that loads ot.py by path (it needs only torch), so the test does not pay for
# importing transformers twice more.
WORKER = """
import importlib.util, sys, torch
rank, world, init_file, scores_path, ot_path = sys.argv[1:]
spec = importlib.util.spec_from_file_location("ot_under_test", ot_path)
ot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ot)
torch.distributed.init_process_group("gloo", init_method="file://" + init_file, rank=int(rank), world_size=int(world))
rows = torch.load(scores_path).chunk(int(world))[int(rank)]
torch.save(ot.sinkhorn(rows, epsilon=0.05, n_iters=3), scores_path + "." + rank)
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_sinkhorn_distributed_equals_single_process_on_the_whole_batch(tmp_path):
    # Two processes each holding half the batch must produce the rows of the single-process result (SwAV).
    scores = cosine_scores(24, 6, seed=6)
    scores_path = str(tmp_path / "scores.pt")
    torch.save(scores, scores_path)
    ot_path = os.path.join(os.path.dirname(hf_align.__file__), "functional", "ot.py")
    ranks = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(r), "2", str(tmp_path / "init"), scores_path, ot_path])
        for r in range(2)
    ]
    assert [p.wait(timeout=120) for p in ranks] == [0, 0]
    together = torch.cat([torch.load(f"{scores_path}.{r}") for r in range(2)])
    torch.testing.assert_close(together, sinkhorn(scores, epsilon=0.05, n_iters=3))
    separately = torch.cat([sinkhorn(half, epsilon=0.05, n_iters=3) for half in scores.chunk(2)])
    assert (together - separately).abs().max() > 1e-3  # the all-reduce changed the answer
