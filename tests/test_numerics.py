"""Numerics: InfoNCE, Sinkhorn and STRUCTURE stay finite in bf16 at extreme temperatures (1e-4 and 1e4); non-finite
features or losses stop training by name and leave the checkpoints written before them intact."""

import hashlib
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hf_align import AlignerModel
from hf_align.features import features_from_tensors
from hf_align.functional import symmetric_infonce
from hf_align.functional.ot import log_sinkhorn, sinkhorn
from hf_align.functional.structure import structure_regularizer
from hf_align.testing import make_paired_task
from hf_align.training import AlignmentArguments, train
from hf_align.training.batches import CaptionSampler

EXTREME = (1e-4, 1e4)


def unit_bf16(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1).bfloat16()


def reference_infonce(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.double()
    targets = torch.arange(len(logits))
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


@pytest.mark.parametrize("tau", EXTREME)
def test_infonce_is_finite_and_exact_on_bf16_logits(tau):
    images, texts = unit_bf16(64, 16, 0), unit_bf16(64, 16, 1)
    logits = ((images @ texts.t()) / tau).requires_grad_()  # bf16: up to 1e4 at tau=1e-4, ~1e-4 at tau=1e4
    assert logits.dtype == torch.bfloat16
    loss = symmetric_infonce(logits)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(loss.double(), reference_infonce(logits.detach()), rtol=1e-6, atol=1e-6)
    if tau == 1e4:  # scores all ~0: every pair is equally likely, loss = ln B
        assert abs(loss.item() - math.log(64)) < 1e-3


def test_infonce_limits_at_tiny_temperature():
    matched = unit_bf16(32, 16, 2)
    perfect = symmetric_infonce((matched @ matched.t()) / 1e-4)
    assert perfect.item() == 0.0  # exp(-1e4) underflows cleanly to a zero loss, never NaN
    same = unit_bf16(1, 16, 3).expand(32, 16)
    tied = symmetric_infonce((same @ same.t()) / 1e-4)
    assert abs(tied.item() - math.log(32)) < 1e-4  # all scores tied at 1e4: ln B, not inf - inf


@pytest.mark.parametrize("tau", EXTREME)
@pytest.mark.parametrize("regularized", [False, True])
def test_bf16_model_loss_and_gradients_are_finite(tau, regularized):
    settings = {"structure_weight": 10.0, "structure_tau": tau, "structure_warmup_steps": 0} if regularized else {}
    torch.manual_seed(0)
    model = AlignerModel.from_feature_dims(
        16, 12, method="mlp", projection_dim=8, hidden_dim=16, temperature=tau, learnable_temperature=True, **settings
    ).to(torch.bfloat16)
    model.train()
    task = make_paired_task(n=64, vision_dim=16, text_dim=12, n_vision_layers=1, n_text_layers=1)
    out = model(vision_features=task.vision[0], text_features=task.text[0], return_loss=True)
    out.loss.backward()
    assert all(torch.isfinite(term) for term in out.loss_terms.values()), out.loss_terms
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # the learnable temperature is clamped at CLIP's 1/100, so tau=1e-4 trains as tau=0.01
    assert out.logits_per_image.abs().max().item() <= 100.0 + 1e-3


@pytest.mark.parametrize("epsilon", EXTREME)
def test_swav_sinkhorn_is_finite_in_bf16(epsilon):
    scores = unit_bf16(48, 8, 4) @ unit_bf16(6, 8, 5).t()  # (n, K) cosines in bf16
    q = sinkhorn(scores, epsilon=epsilon, n_iters=3)
    assert torch.isfinite(q).all() and (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(48), rtol=0, atol=1e-4)  # rows exactly normalised
    if epsilon == 1e4:  # no preference at all: the uniform assignment
        torch.testing.assert_close(q, torch.full((48, 6), 1 / 6), rtol=0, atol=1e-4)
    else:  # near-hard assignments: each row piles its mass on one code or splits it among bf16-tied scores
        assert (q <= 1 + 1e-6).all() and (q.max(1).values >= 0.5 - 1e-6).all()


@pytest.mark.parametrize("epsilon", EXTREME)
def test_transport_plan_is_finite_in_bf16_with_finite_gradients(epsilon):
    x, y = unit_bf16(10, 8, 6), unit_bf16(12, 8, 7)
    cost = (2 - 2 * x @ y.t()).float().requires_grad_()
    plan = log_sinkhorn(cost.bfloat16(), epsilon=epsilon, n_iters=50)
    (plan * cost).sum().backward()
    assert torch.isfinite(plan).all() and torch.isfinite(cost.grad).all()
    torch.testing.assert_close(plan.sum(0), torch.full((12,), 1 / 12), rtol=0, atol=1e-5)  # last update: columns exact
    if epsilon == 1e4:
        torch.testing.assert_close(plan, torch.full((10, 12), 1 / 120), rtol=1e-3, atol=0)


@pytest.mark.parametrize("tau", EXTREME)
@pytest.mark.parametrize("divergence", ["js", "authors_rkl"])
def test_structure_is_finite_in_bf16(tau, divergence):
    frozen = unit_bf16(32, 16, 8)
    aligned = unit_bf16(32, 8, 9).float().requires_grad_()
    value = structure_regularizer(frozen, aligned.bfloat16(), levels=3, tau=tau, divergence=divergence)
    value.backward()
    assert torch.isfinite(value) and value.item() >= 0 and torch.isfinite(aligned.grad).all()
    if divergence == "js":
        assert value.item() <= math.log(2) + 1e-6
    if tau == 1e4:  # both transition matrices are uniform: nothing to preserve
        assert value.item() < 1e-6


# ---------------------------------------------------------------------------------------------- training guards
def _files_digest(folder) -> dict:
    digests = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as handle:
            digests[name] = hashlib.sha256(handle.read()).hexdigest()
    return digests


def _task_features(poison_row=None, value=None):
    task = make_paired_task(n=200, vision_dim=8, text_dim=6, n_vision_layers=1, n_text_layers=1, seed=5)
    vision = task.vision[0].clone()
    if poison_row is not None:
        vision[poison_row] = value
    return features_from_tensors({0: vision}, {0: task.text[0]})


ARGS = dict(max_steps=12, per_device_train_batch_size=20, eval_fraction=0.0, save_steps=3, logging_steps=3, seed=11)


def test_nan_features_are_refused_before_the_first_step_and_checkpoints_stay(tmp_path):
    out = str(tmp_path / "run")
    train(
        AlignerModel.from_feature_dims(8, 6, projection_dim=4),
        _task_features(),
        AlignmentArguments(output_dir=out, **ARGS),
    )
    before = {
        name: _files_digest(os.path.join(out, name)) for name in os.listdir(out) if name.startswith("checkpoint-")
    }
    assert sorted(before) == ["checkpoint-12", "checkpoint-9"]
    poisoned = _task_features(poison_row=17, value=float("nan"))
    args = AlignmentArguments(output_dir=out, resume_from_checkpoint="latest", **{**ARGS, "max_steps": 15})
    with pytest.raises(
        ValueError, match=r"the feature cache holds NaN or Inf in vision_features of 1 row\(s\), e.g. rows \[17\]"
    ):
        train(AlignerModel.from_feature_dims(8, 6, projection_dim=4), poisoned, args)
    after = {name: _files_digest(os.path.join(out, name)) for name in os.listdir(out) if name.startswith("checkpoint-")}
    assert after == before


def test_nan_loss_inside_an_unchecked_window_is_named_by_its_own_step(monkeypatch):
    # Losses are checked for NaN once per window of min(logging_steps, 50) steps (and before logging, evaluating and
    # saving). Here nothing is logged, evaluated or saved before step 12: the NaN of step 6 is found at the end of
    # the run and still named by its own step, epoch, batch and rows.
    rows = CaptionSampler(torch.arange(200), torch.arange(200), "auto", ARGS["seed"]).epoch_rows(0)
    features = _task_features(poison_row=int(rows[6 * 20 + 3]), value=7.0)
    model = AlignerModel.from_feature_dims(8, 6, projection_dim=4)
    embed_image = model.aligner.embed_image

    def overflowing(features, mask=None):
        embeds = embed_image(features, mask)
        return torch.where((features == 7.0).all(1, keepdim=True), torch.full_like(embeds, float("inf")), embeds)

    monkeypatch.setattr(model.aligner, "embed_image", overflowing)
    with pytest.raises(FloatingPointError) as error:
        train(model, features, AlignmentArguments(**{**ARGS, "logging_steps": 20}))
    expected = f"non-finite training loss nan at step 6 (epoch 0, batch 6, first rows {rows[120:128].tolist()}); "
    assert str(error.value).startswith(expected)
    assert "The last good checkpoint is None" in str(error.value)


def test_nan_loss_stops_training_with_step_and_batch_keeping_the_last_good_checkpoint(tmp_path, monkeypatch):
    # The row first drawn in batch 6 of epoch 0 (10 batches per epoch) carries a marker value; the aligner is made to
    # overflow on it, as an fp16 method might on a real outlier.
    rows = CaptionSampler(torch.arange(200), torch.arange(200), "auto", ARGS["seed"]).epoch_rows(0)
    marked = int(rows[6 * 20 + 3])
    features = _task_features(poison_row=marked, value=7.0)
    clean_out = str(tmp_path / "clean")
    clean_args = AlignmentArguments(output_dir=clean_out, **{**ARGS, "save_total_limit": 10})
    train(AlignerModel.from_feature_dims(8, 6, projection_dim=4), features, clean_args)

    out = str(tmp_path / "run")
    model = AlignerModel.from_feature_dims(8, 6, projection_dim=4)
    embed_image = model.aligner.embed_image

    def overflowing(features, mask=None):
        embeds = embed_image(features, mask)
        return torch.where((features == 7.0).all(1, keepdim=True), torch.full_like(embeds, float("inf")), embeds)

    monkeypatch.setattr(model.aligner, "embed_image", overflowing)
    with pytest.raises(FloatingPointError) as error:
        train(model, features, AlignmentArguments(output_dir=out, **ARGS))
    message = str(error.value)
    assert message.startswith("non-finite training loss nan at step 6 (epoch 0, batch 6, first rows ")
    assert f"The last good checkpoint is {os.path.join(out, 'checkpoint-6')}" in message
    assert sorted(os.listdir(out)) == ["checkpoint-3", "checkpoint-6"]  # no .tmp, no final model
    with open(os.path.join(out, "checkpoint-6", "trainer_state.json")) as handle:
        assert json.load(handle)["global_step"] == 6
    # the checkpoint holds exactly the weights of a clean run at step 6: the bad batch changed nothing
    saved, clean = (load_file(os.path.join(o, "checkpoint-6", "aligner.safetensors")) for o in (out, clean_out))
    for key in clean:
        torch.testing.assert_close(saved[key], clean[key], rtol=0, atol=0)
