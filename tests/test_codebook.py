"""`codebook` method: swapped prediction of Sinkhorn assignments from an EMA teacher, k-means initialisation,
diagnostics and dead-code re-seeding, checkpoint behaviour, and training on the synthetic paired task."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import hf_align
from hf_align import METHODS, AlignerModel
from hf_align.evaluation import retrieval_metrics
from hf_align.functional.ot import sinkhorn
from hf_align.methods.codebook import CodebookAligner, auto_queue_length, kmeans, swapped_prediction_loss
from hf_align.testing import make_paired_task
from hf_align.training import AlignmentArguments

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def task():
    return make_paired_task(n=1200, n_clusters=8, seed=0)


def codebook_model(**kwargs):
    torch.manual_seed(0)
    settings = dict(projection_dim=16, num_codes=8)
    settings.update(kwargs)
    return AlignerModel.from_feature_dims(64, 48, method="codebook", **settings)


def batch(task, size=64, start=0):
    return task.vision[2][start : start + size], task.text[2][start : start + size]


def kill_code_zero(aligner):
    """Point code 0 orthogonally to every possible embedding (D = 128 > 64 + 48: the heads' joint column space
    leaves room), so its cosine is 0 where each sample's own k-means code scores higher: nobody picks it."""
    heads = torch.cat([aligner.vision_head.weight, aligner.text_head.weight], dim=1).detach()  # (128, 112)
    with torch.no_grad():
        aligner.codebook[0] = torch.linalg.svd(heads).U[:, -1]


def test_registered_with_heads_and_codebook_only():
    assert METHODS["codebook"] is CodebookAligner
    model = codebook_model()
    shapes = {name: tuple(p.shape) for name, p in model.aligner.named_parameters()}
    assert shapes == {"vision_head.weight": (16, 64), "text_head.weight": (16, 48), "codebook": (8, 16)}


@pytest.mark.parametrize("epsilon", [0, -0.05])
def test_bad_epsilon_is_refused(epsilon):
    with pytest.raises(ValueError, match=rf"sinkhorn_epsilon must be in \(0.0, inf\], got {epsilon}"):
        codebook_model(sinkhorn_epsilon=epsilon)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_codes=0), r"num_codes must be a positive int, got 0"),
        (dict(momentum=1.0), r"momentum must be in \[0.0, 1.0\), got 1.0"),
        (dict(code_temperature=0.0), r"code_temperature must be in \(0.0, inf\], got 0.0"),
        (dict(codebook_weight=-1.0), r"codebook_weight must be in \[0.0, inf\], got -1.0"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        codebook_model(**kwargs)


def test_codebook_larger_than_training_set_is_refused(task):
    model = codebook_model(num_codes=32)
    vision, text = batch(task, size=20)
    message = (
        r"codebook: num_codes=32 codes need at least 32 training pairs for the k-means initialisation, but "
        r"init_from_data got 20\. Lower num_codes to at most 20, or give it more pairs: hf_align\.train passes "
        r"min\(AlignmentArguments\.init_samples, number of training pairs\)"
    )
    with pytest.raises(ValueError, match=message):
        model.aligner.init_from_data(vision, text)
    # hf_align.train stops there, before the optimiser exists or any step runs
    small = make_paired_task(n=20, seed=1).to_features()
    args = AlignmentArguments(max_steps=5, per_device_train_batch_size=8, eval_fraction=0.0, save_model=False)
    before = {name: p.detach().clone() for name, p in model.aligner.named_parameters()}
    with pytest.raises(ValueError, match=message):
        hf_align.train(model, small, args)
    for name, p in model.aligner.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
    with pytest.raises(ValueError, match=r"k-means with k=5 clusters needs at least 5 points, got 4"):
        kmeans(torch.randn(4, 3), 5)


def test_kmeans_is_seeded_and_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    labels = torch.arange(300) % 3
    points = centres[labels] + 0.5 * torch.randn(300, 2, generator=g)
    found = kmeans(points, 3, seed=1, batch_size=64)  # several chunks
    torch.testing.assert_close(kmeans(points, 3, seed=1, batch_size=64), found)
    # Each true centre is recovered (to within the noise of a 100-point mean).
    distance = torch.cdist(centres, found)
    assert (distance.min(dim=1).values < 0.3).all()
    assert sorted(distance.argmin(dim=1).tolist()) == [0, 1, 2]


def test_init_from_data_makes_pairs_prefer_the_same_code(task):
    model = codebook_model(num_codes=8, projection_dim=64)
    aligner = model.aligner
    vision, text = batch(task, size=600)
    with torch.no_grad():
        z_v, z_t = F.normalize(aligner.embed_image(vision), dim=1), F.normalize(aligner.embed_text(text), dim=1)

    def agreement(codes):
        codes = F.normalize(codes, dim=1)
        return ((z_v @ codes.T).argmax(1) == (z_t @ codes.T).argmax(1)).float().mean().item()

    # The alternative the docstring rejects: k-means on the union of both clouds gives modality-specific codes.
    assert agreement(kmeans(torch.cat([z_v, z_t]), 8, seed=3)) < 0.05
    aligner.init_from_data(vision, text, seed=3)
    codes = aligner.codebook.detach().clone()
    torch.testing.assert_close(codes.norm(dim=1), torch.ones(8))
    assert agreement(codes) > 0.9
    assert len((z_v @ codes.T).argmax(1).unique()) == 8  # every code starts in use
    aligner.init_from_data(vision, text, seed=3)
    torch.testing.assert_close(aligner.codebook.detach(), codes)  # seeded


def test_swapped_prediction_loss_matches_hand_computation():
    s_v = torch.tensor([[0.2, -0.1, 0.5], [0.0, 0.3, -0.4]])
    s_t = torch.tensor([[0.1, 0.1, -0.2], [0.6, -0.3, 0.0]])
    q_v = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.5, 0.5]])
    q_t = torch.tensor([[0.1, 0.1, 0.8], [1.0, 0.0, 0.0]])
    tau = 0.5

    def log_softmax(row):
        norm = math.log(sum(math.exp(x / tau) for x in row))
        return [x / tau - norm for x in row]

    expected = 0.0
    for i in range(2):
        expected -= sum(q * lp for q, lp in zip(q_t[i].tolist(), log_softmax(s_v[i].tolist()))) / 2
        expected -= sum(q * lp for q, lp in zip(q_v[i].tolist(), log_softmax(s_t[i].tolist()))) / 2
    loss = swapped_prediction_loss(s_v, s_t, q_v, q_t, tau)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_extra_loss_is_weighted_swapped_prediction_on_teacher_assignments(task):
    model = codebook_model(codebook_weight=2.5, sinkhorn_iters=3, code_temperature=0.1)
    vision, text = batch(task)
    out = model(vision_features=vision, text_features=text, return_loss=True)
    assert set(out.loss_terms) == {"infonce", "codebook"}
    aligner = model.aligner
    # At the first step the teacher is a copy of the student, so its scores are the student's.
    s_v, s_t = aligner.code_scores(out.image_embeds), aligner.code_scores(out.text_embeds)
    q_v, q_t = sinkhorn(s_v, 0.05, 3), sinkhorn(s_t, 0.05, 3)
    expected = 2.5 * swapped_prediction_loss(s_v, s_t, q_v, q_t, 0.1)
    torch.testing.assert_close(out.loss_terms["codebook"], expected)
    torch.testing.assert_close(out.loss, out.loss_terms["infonce"] + expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(vision_features=vision, text_features=text, return_loss=True).loss_terms["codebook"]
    assert low.dtype == torch.float32 and torch.isfinite(low)


def test_ema_update_matches_hand_computed_step(task):
    model = codebook_model(momentum=0.9)
    aligner = model.aligner
    model(vision_features=batch(task)[0], text_features=batch(task)[1], return_loss=True)  # teacher created
    before = {name: t.clone() for name, t in aligner.teacher_state().items()}
    with torch.no_grad():
        for p in aligner.parameters():
            p.add_(torch.linspace(-1, 1, p.numel()).reshape(p.shape))
    student = {name: p.detach().clone() for name, p in aligner.named_parameters()}
    aligner.after_optimizer_step()
    for name, teacher in aligner.teacher_state().items():
        torch.testing.assert_close(teacher, 0.9 * before[name] + 0.1 * student[name])


def test_teacher_gets_no_gradient_and_is_not_saved(task, tmp_path):
    model = codebook_model()
    vision, text = batch(task)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for start in (0, 64, 128):
        loss = model(
            vision_features=task.vision[2][start : start + 64],
            text_features=task.text[2][start : start + 64],
            return_loss=True,
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.aligner.after_optimizer_step()
    teacher = model.aligner.teacher_state()
    assert all(not t.requires_grad and t.grad is None for t in teacher.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.aligner.parameters())
    assert not (teacher["codebook"] == model.aligner.codebook).all()  # it lags the student
    # The teacher is neither a parameter nor in any state dict, so the checkpoint is the inference weights only.
    ids = {id(t) for t in teacher.values()}
    assert not ids & {id(p) for p in model.parameters()}
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == {"aligner.vision_head.weight", "aligner.text_head.weight", "aligner.codebook", "logit_scale"}
    model.eval()
    reloaded = AlignerModel.from_pretrained(tmp_path, load_encoders=False)
    assert torch.equal(reloaded.aligner.codebook, model.aligner.codebook)
    for method in ("get_image_features", "get_text_features"):
        key = "vision_features" if method == "get_image_features" else "text_features"
        value = vision if key == "vision_features" else text
        assert torch.equal(getattr(reloaded, method)(**{key: value}), getattr(model, method)(**{key: value}))


def test_training_state_resumes_the_teacher_exactly(task):
    def steps(model, starts):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        model.train()
        for start in starts:
            loss = model(
                vision_features=task.vision[2][start : start + 64],
                text_features=task.text[2][start : start + 64],
                return_loss=True,
            ).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.aligner.after_optimizer_step()

    # The 2-step window straddles the checkpoint at step 1 and closes with a re-seeding of the dead code 0 (left
    # alone a little longer, the equal-partition targets would revive it by themselves).
    straight = codebook_model(projection_dim=128, usage_window=2)
    straight.aligner.init_from_data(*batch(task, size=400))
    kill_code_zero(straight.aligner)
    steps(straight, [0])
    resumed = codebook_model(projection_dim=128, usage_window=2)
    resumed.load_state_dict(straight.state_dict())
    resumed.aligner.load_training_state(straight.aligner.training_state())
    for model in (straight, resumed):
        torch.manual_seed(1)  # the same RNG for both continuations (train() restores it from the checkpoint)
        steps(model, [64, 128])
    for name, teacher in straight.aligner.teacher_state().items():
        torch.testing.assert_close(resumed.aligner.teacher_state()[name], teacher, rtol=0, atol=0)
    assert straight.aligner.diagnostics()["codebook_reseeded"] >= 1
    assert resumed.aligner.diagnostics() == straight.aligner.diagnostics()
    with pytest.raises(ValueError, match=r"training state must have keys \['agreed', 'counters'"):
        resumed.aligner.load_training_state({"steps": torch.tensor(1)})


def test_diagnostics_perplexity_and_dead_code_reseeding(task):
    model = codebook_model(num_codes=8, projection_dim=128, usage_window=2)
    aligner = model.aligner
    vision, text = batch(task, size=400)
    aligner.init_from_data(vision, text)
    kill_code_zero(aligner)
    model.train()
    out = model(vision_features=vision[:64], text_features=text[:64], return_loss=True)
    hard = torch.cat([aligner.code_scores(out.image_embeds).argmax(1), aligner.code_scores(out.text_embeds).argmax(1)])
    p = torch.bincount(hard, minlength=8).double() / 128
    expected = math.exp(-sum(x * math.log(x) for x in p.tolist() if x > 0))
    stats = aligner.diagnostics()  # the first window is still open: it covers this one batch
    assert stats["codebook_perplexity"] == pytest.approx(expected, rel=1e-6)
    assert stats["codebook_dead_codes"] == float((p == 0).sum()) >= 1
    assert stats["codebook_reseeded"] == 0.0
    aligner.after_optimizer_step()
    out = model(vision_features=vision[64:128], text_features=text[64:128], return_loss=True)
    aligner.after_optimizer_step()  # closes the 2-step window: code 0 was never used
    stats = aligner.diagnostics()
    assert stats["codebook_dead_codes"] >= 1 and stats["codebook_reseeded"] == stats["codebook_dead_codes"]
    assert 1.0 < stats["codebook_perplexity"] <= 8.0
    pairs = F.normalize(F.normalize(out.image_embeds, dim=1) + F.normalize(out.text_embeds, dim=1), dim=1)
    code0 = F.normalize(aligner.codebook[0].detach(), dim=0)
    assert (pairs.detach() @ code0).max() > 0.99  # moved onto a recent pair embedding
    torch.testing.assert_close(aligner.teacher_state()["codebook"][0], aligner.codebook[0].detach())


def test_no_reseeding_when_disabled(task):
    model = codebook_model(num_codes=8, projection_dim=128, usage_window=1, reseed_dead_codes=False)
    aligner = model.aligner
    aligner.init_from_data(*batch(task, size=400))
    kill_code_zero(aligner)
    dead_code = aligner.codebook[0].detach().clone()
    model.train()
    model(vision_features=batch(task)[0], text_features=batch(task)[1], return_loss=True)
    aligner.after_optimizer_step()
    stats = aligner.diagnostics()
    assert stats["codebook_dead_codes"] >= 1 and stats["codebook_reseeded"] == 0.0
    assert torch.equal(aligner.codebook[0].detach(), dead_code)


def test_trainer_callback_runs_the_ema(task):
    # transformers.Trainer users get after_optimizer_step from the library's callback.
    from hf_align.integrations.trainer import CardDataCallback

    model = codebook_model(momentum=0.5)
    model(vision_features=batch(task)[0], text_features=batch(task)[1], return_loss=True)
    before = model.aligner.teacher_state()["codebook"].clone()
    with torch.no_grad():
        model.aligner.codebook.add_(1.0)
    CardDataCallback().on_step_end(None, None, None, model=model)
    torch.testing.assert_close(
        model.aligner.teacher_state()["codebook"], 0.5 * before + 0.5 * model.aligner.codebook.detach()
    )


def test_trains_on_synthetic_task_without_collapse(task):
    train_task, test_task = task.split(800)
    results = {}
    for method, kwargs in (("linear", {}), ("codebook", dict(num_codes=32))):
        torch.manual_seed(0)
        model = AlignerModel.from_feature_dims(64, 48, method=method, projection_dim=64, **kwargs)
        run = hf_align.train(
            model,
            train_task.to_features(),
            AlignmentArguments(
                max_steps=120, per_device_train_batch_size=128, eval_fraction=0.0, logging_steps=40, seed=0
            ),
        )
        model.eval()
        with torch.no_grad():
            scores = model(vision_features=test_task.vision[2], text_features=test_task.text[2]).logits_per_image
        results[method] = retrieval_metrics(scores, torch.arange(len(test_task.labels)))["mean_R@1"]
        if method == "codebook":
            perplexities = [h["diag_codebook_perplexity"] for h in run.history if "diag_codebook_perplexity" in h]
    chance = 100.0 / len(test_task.labels)  # 0.25 % R@1
    assert results["codebook"] > 100 * chance  # measured 41.5 (linear: 38.1)
    assert results["codebook"] > results["linear"] - 5
    assert len(perplexities) == 3 and min(perplexities) > 8  # of 32 codes (measured 25.6): no collapse onto a few


# ---------------------------------------------------------------------------------------------- SwAV's queue
@pytest.mark.parametrize(
    "rows,codes,expected", [(8, 32, 24), (256, 3000, 2816), (10, 25, 20), (32, 32, 0), (100, 64, 0), (1, 3, 2)]
)
def test_auto_queue_length_makes_batch_plus_queue_reach_the_codebook_in_whole_batches(rows, codes, expected):
    assert auto_queue_length(rows, codes) == expected
    if expected:
        assert expected % rows == 0 and rows + expected >= codes > rows + expected - rows


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(queue_length=-8), r"queue_length must be 'auto' or an int >= 0 \(0 = no queue\), got -8"),
        (dict(queue_length="full"), r"queue_length must be 'auto' or an int >= 0 \(0 = no queue\), got 'full'"),
        (dict(queue_start_steps=-1), r"queue_start_steps must be an int >= 0, got -1"),
        (dict(freeze_codebook_steps=-2), r"freeze_codebook_steps must be an int >= 0, got -2"),
    ],
)
def test_bad_queue_and_freeze_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        codebook_model(**kwargs)


def test_sinkhorn_runs_on_the_queue_rescored_with_the_current_codes_and_keeps_the_batch_rows(task):
    """B = 8 < K = 32: the auto queue holds 24 rows (3 batches), is used once full, and holds teacher *embeddings*
    (re-scored with the codes of the current step), newest first."""
    model = codebook_model(num_codes=32, codebook_weight=1.0)
    aligner = model.aligner
    model.train()
    batches = [batch(task, size=8, start=8 * i) for i in range(5)]
    codes = aligner.teacher_codes()
    pushed = []
    for vision, text in batches[:3]:  # filling: targets from the batch alone
        out = model(vision_features=vision, text_features=text, return_loss=True)
        z_v, z_t = aligner.teacher_embeddings(vision, text)
        s_v, s_t = aligner.code_scores(out.image_embeds), aligner.code_scores(out.text_embeds)
        expected = swapped_prediction_loss(s_v, s_t, sinkhorn(z_v @ codes.T), sinkhorn(z_t @ codes.T), 0.1)
        torch.testing.assert_close(out.loss_terms["codebook"], expected)
        pushed.append((z_v, z_t))
    assert aligner.diagnostics()["codebook_queue_filled"] == 24.0
    # The teacher moves (heads and codes) before the fourth batch: the queue keeps the embeddings made when each
    # batch was pushed, and scores them against the codes of now.
    teacher = aligner.teacher_state()
    with torch.no_grad():
        for tensor in teacher.values():
            tensor.add_(0.3 * torch.randn_like(tensor))
    queue_v = torch.cat([pushed[2][0], pushed[1][0], pushed[0][0]])
    queue_t = torch.cat([pushed[2][1], pushed[1][1], pushed[0][1]])
    torch.testing.assert_close(aligner.queue("vision"), queue_v, rtol=0, atol=0)
    torch.testing.assert_close(aligner.queue("text"), queue_t, rtol=0, atol=0)
    vision, text = batches[3]
    out = model(vision_features=vision, text_features=text, return_loss=True)
    codes = aligner.teacher_codes()
    z_v, z_t = aligner.teacher_embeddings(vision, text)
    q_v = sinkhorn(torch.cat([queue_v, z_v]) @ codes.T)[-8:]
    q_t = sinkhorn(torch.cat([queue_t, z_t]) @ codes.T)[-8:]
    s_v, s_t = aligner.code_scores(out.image_embeds), aligner.code_scores(out.text_embeds)
    torch.testing.assert_close(out.loss_terms["codebook"], swapped_prediction_loss(s_v, s_t, q_v, q_t, 0.1))
    # the queue changes the targets (32 rows share the codes instead of 8), and rows of the batch sum to 1
    alone = swapped_prediction_loss(s_v, s_t, sinkhorn(z_v @ codes.T), sinkhorn(z_t @ codes.T), 0.1)
    assert abs(out.loss_terms["codebook"].item() - alone.item()) > 1e-3
    torch.testing.assert_close(q_v.sum(1), torch.ones(8))
    # FIFO: the fourth batch went in front, the first one dropped out
    torch.testing.assert_close(aligner.queue("vision"), torch.cat([z_v, queue_v[:16]]), rtol=0, atol=0)
    # evaluation reads the full queue but never pushes into it
    model.eval()
    model(vision_features=batches[4][0], text_features=batches[4][1], return_loss=True)
    torch.testing.assert_close(aligner.queue("vision"), torch.cat([z_v, queue_v[:16]]), rtol=0, atol=0)


def test_queue_starts_at_queue_start_steps_and_is_off_when_the_batch_covers_the_codes(task):
    model = codebook_model(num_codes=32, queue_start_steps=2)
    aligner = model.aligner
    model.train()
    filled = []
    for i in range(4):
        vision, text = batch(task, size=8, start=8 * i)
        model(vision_features=vision, text_features=text, return_loss=True)
        aligner.after_optimizer_step()
        filled.append(aligner.diagnostics()["codebook_queue_filled"])
    assert filled == [0.0, 0.0, 8.0, 16.0]  # steps 0 and 1 push nothing
    assert aligner.queue("vision") is None  # not full yet: 16 of 24 rows
    # B >= K: "auto" resolves to no queue at all
    wide = codebook_model(num_codes=8)
    wide.train()
    wide(vision_features=batch(task)[0], text_features=batch(task)[1], return_loss=True)
    assert "codebook_queue_filled" not in wide.aligner.diagnostics()
    assert wide.aligner.training_state()["queue_state"].tolist() == [0, 0]
    # an explicit length is used as given (rows, not batches)
    fixed = codebook_model(num_codes=32, queue_length=12)
    fixed.train()
    for i in range(2):
        fixed(vision_features=batch(task, 8, 8 * i)[0], text_features=batch(task, 8, 8 * i)[1], return_loss=True)
    assert fixed.aligner.queue("vision").shape == (12, 16)


def test_frozen_codebook_gets_no_update_for_freeze_codebook_steps(task):
    model = codebook_model(num_codes=8, freeze_codebook_steps=2, reseed_dead_codes=False)
    aligner = model.aligner
    aligner.init_from_data(*batch(task, size=400))
    start = aligner.codebook.detach().clone()
    heads = aligner.vision_head.weight.detach().clone()
    optimizer = torch.optim.AdamW(aligner.parameters(), lr=0.05, weight_decay=0.1)  # decay would move it too
    model.train()
    moved = []
    for i in range(3):
        vision, text = batch(task, size=64, start=64 * i)
        model(vision_features=vision, text_features=text, return_loss=True).loss.backward()
        frozen_grad = aligner.codebook.grad is None
        optimizer.step()
        optimizer.zero_grad()
        aligner.after_optimizer_step()
        moved.append((frozen_grad, not torch.equal(aligner.codebook.detach(), start)))
    assert moved == [(True, False), (True, False), (False, True)]
    assert not torch.equal(aligner.vision_head.weight.detach(), heads)  # the heads train meanwhile
    assert not aligner.codebook_frozen


def test_training_state_with_a_queue_resumes_exactly(task, tmp_path):
    from safetensors.torch import save_file

    def steps(model, starts):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        model.train()
        for start in starts:
            vision, text = batch(task, size=8, start=start)
            loss = model(vision_features=vision, text_features=text, return_loss=True).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.aligner.after_optimizer_step()

    settings = dict(num_codes=32, freeze_codebook_steps=3, queue_start_steps=1)
    straight = codebook_model(**settings)
    straight.aligner.init_from_data(*batch(task, size=400))
    steps(straight, [0, 8])  # step 0 pushes nothing, step 1 fills 8 of 24 rows
    save_file({k: v.contiguous() for k, v in straight.aligner.training_state().items()}, tmp_path / "state.safetensors")
    resumed = codebook_model(**settings)
    resumed.load_state_dict(straight.state_dict())
    resumed.aligner.load_training_state(load_file(tmp_path / "state.safetensors"))
    assert resumed.aligner.diagnostics()["codebook_queue_filled"] == 8.0
    for model in (straight, resumed):
        torch.manual_seed(1)
        steps(model, [16, 24, 32, 40])  # the queue fills, is used from step 4 on, and the codebook thaws at step 3
    assert straight.aligner.queue("vision") is not None
    for key, value in straight.aligner.training_state().items():
        torch.testing.assert_close(resumed.aligner.training_state()[key], value, rtol=0, atol=0, msg=key)
    for name, p in straight.aligner.named_parameters():
        torch.testing.assert_close(dict(resumed.aligner.named_parameters())[name], p, rtol=0, atol=0)
    # a state written before the queue existed loads with an empty queue; inconsistent queue tensors are refused
    old = {k: v for k, v in straight.aligner.training_state().items() if not k.startswith("queue")}
    resumed.aligner.load_training_state(old)
    assert resumed.aligner.queue("vision") is None
    assert resumed.aligner.training_state()["queue_state"].tolist() == [-1, 0]
    bad = dict(straight.aligner.training_state())
    bad["queue.text"] = bad["queue.text"][:5]
    with pytest.raises(
        ValueError, match=r"queue_state gives 24 queue rows, so the queue tensors must be \{'queue.vision': \(24, 16\)"
    ):
        resumed.aligner.load_training_state(bad)


def test_queue_through_train_on_small_batches(task):
    train_task, _ = task.split(800)
    torch.manual_seed(0)
    model = AlignerModel.from_feature_dims(64, 48, method="codebook", projection_dim=32, num_codes=64)
    run = hf_align.train(
        model,
        train_task.to_features(),
        AlignmentArguments(max_steps=12, per_device_train_batch_size=16, eval_fraction=0.0, logging_steps=4, seed=0),
    )
    filled = [h["diag_codebook_queue_filled"] for h in run.history if "diag_codebook_queue_filled" in h]
    assert filled == [48.0, 48.0, 48.0]  # 16 + 48 >= 64 codes: three batches, full from step 3
    assert model.aligner.queue("vision").shape == (48, 32)
