"""Training pairs and what train() does with them: same-image masking (hand-computed InfoNCE), caption sampling per
epoch, validation at full regulariser weight with every term reported, AdamW / scheduler options, recipes."""

import dataclasses
import math
import os

import datasets
import pytest
import torch

import hf_align
from hf_align import AlignerModel, AlignmentArguments, train
from hf_align.commands import COMMANDS
from hf_align.commands.cli import parse_command_args
from hf_align.features import features_for, features_from_tensors
from hf_align.functional.losses import same_image_mask
from hf_align.testing import make_paired_task
from hf_align.training import loop as training_module
from hf_align.training.batches import BatchSource, CaptionSampler
from hf_align.training.loop import build_optimizer, evaluate_on_rows


def multi_caption_cache(n_images=60, captions=(3, 5), seed=0):
    """Each image of the synthetic task repeated with 3-5 captions: the image's text features plus small noise.
    Rows are grouped by image (image ids 1000 + i) in cache order."""
    task = make_paired_task(n=n_images, n_vision_layers=1, n_text_layers=1, seed=seed)
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(captions[0], captions[1] + 1, (n_images,), generator=g)
    owner = torch.arange(n_images).repeat_interleave(counts)
    text = task.text[0][owner] + 0.05 * torch.randn(len(owner), task.text[0].shape[1], generator=g)
    return features_from_tensors({0: task.vision[0][owner]}, {0: text}, image_id=1000 + owner), counts


# ---------------------------------------------------------------------------------------------- the masked loss
def test_masked_infonce_matches_hand_computation():
    logits = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    ids = torch.tensor([7, 7, 9])
    # rows 0 and 1 show the same image: each loses its 1 off-diagonal score in both directions
    masked = (2 * math.log(1 + math.exp(-2)) + math.log(1 + 2 * math.exp(-2))) / 3
    unmasked = (2 * math.log(1 + math.exp(-1) + math.exp(-2)) + math.log(1 + 2 * math.exp(-2))) / 3
    assert masked == pytest.approx(0.164467, abs=1e-6) and unmasked == pytest.approx(0.351586, abs=1e-6)
    assert hf_align.functional.symmetric_infonce(logits, ids).item() == pytest.approx(masked, rel=1e-6)
    assert hf_align.functional.symmetric_infonce(logits).item() == pytest.approx(unmasked, rel=1e-6)
    assert hf_align.functional.symmetric_infonce(logits, torch.tensor([1, 2, 3])).item() == pytest.approx(
        unmasked, rel=1e-6
    )


def test_masking_applies_to_both_directions_of_an_asymmetric_matrix():
    logits = torch.tensor([[3.0, 1.0, 0.0], [2.0, 1.0, 1.0], [0.0, 2.0, 2.0]])
    ids = torch.tensor([4, 4, 6])
    rows = [math.log(1 + math.exp(-3)), math.log(2), math.log(1 + 2 * math.exp(2)) - 2]  # S[0, 1], S[1, 0] masked
    columns = [math.log(1 + math.exp(-3)), math.log(1 + math.e), math.log(1 + math.exp(-2) + math.exp(-1))]
    expected = 0.5 * (sum(rows) / 3 + sum(columns) / 3)
    assert hf_align.functional.symmetric_infonce(logits, ids).item() == pytest.approx(expected, rel=1e-6)
    grad_logits = logits.clone().requires_grad_()
    hf_align.functional.symmetric_infonce(grad_logits, ids).backward()
    assert grad_logits.grad[0, 1] == 0 and grad_logits.grad[1, 0] == 0 and torch.isfinite(grad_logits.grad).all()


def test_model_forward_masks_with_image_ids():
    torch.manual_seed(0)
    model = AlignerModel.from_feature_dims(6, 5, projection_dim=4).eval()
    vision, text, ids = torch.randn(5, 6), torch.randn(5, 5), torch.tensor([3, 3, 1, 3, 2])
    out = model(vision_features=vision, text_features=text, return_loss=True, image_ids=ids)
    assert out.loss_terms["infonce"].item() == pytest.approx(
        hf_align.functional.symmetric_infonce(out.logits_per_image, ids).item(), rel=1e-6
    )
    plain = model(vision_features=vision, text_features=text, return_loss=True)
    assert plain.loss.item() == pytest.approx(
        hf_align.functional.symmetric_infonce(out.logits_per_image).item(), rel=1e-6
    )
    assert plain.loss.item() > out.loss.item()


def test_same_image_mask_and_its_errors():
    mask = same_image_mask(torch.tensor([5, 2, 5, 5]), 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    for i, j in ((0, 2), (0, 3), (2, 3)):
        expected[i, j] = expected[j, i] = True
    assert torch.equal(mask, expected)
    with pytest.raises(
        ValueError, match=r"image_ids must be a \(4,\) tensor, one image id per pair of the batch, got \(3,\)"
    ):
        same_image_mask(torch.tensor([1, 2, 3]), 4)
    with pytest.raises(ValueError, match=r"image_ids must be a \(2,\) tensor, .* got list"):
        same_image_mask([1, 2], 2)
    with pytest.raises(ValueError, match="image_ids must hold integer ids, got dtype torch.float32"):
        same_image_mask(torch.tensor([1.0, 2.0]), 2)
    model = AlignerModel.from_feature_dims(6, 5, projection_dim=4)
    with pytest.raises(ValueError, match=r"image_ids must be a \(3,\) tensor"):
        model(
            vision_features=torch.randn(3, 6),
            text_features=torch.randn(3, 5),
            return_loss=True,
            image_ids=torch.arange(4),
        )


# ---------------------------------------------------------------------------------------------- caption sampling
def test_per_epoch_sampling_takes_each_image_once_with_a_fresh_caption():
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    rows = torch.arange(10) + 100
    sampler = CaptionSampler(rows, ids, "auto", seed=3)
    assert sampler.sampling == "per_epoch" and sampler.rows_per_epoch == 4
    owner = dict(zip(rows.tolist(), ids.tolist()))
    epochs = [sampler.epoch_rows(e) for e in range(8)]
    for chosen in epochs:
        assert sorted(owner[r] for r in chosen.tolist()) == [0, 1, 2, 3]  # every image exactly once
    # captions change across epochs (image 3 has 4 of them), and over 8 epochs more than one is used per image
    assert len({tuple(sorted(e.tolist())) for e in epochs}) > 1
    assert len({r for e in epochs for r in e.tolist() if owner[r] == 3}) > 1
    # a fixed (seed, epoch) gives the same rows and order: what a resumed run relies on
    assert torch.equal(CaptionSampler(rows, ids, "per_epoch", seed=3).epoch_rows(5), epochs[5])
    assert not torch.equal(CaptionSampler(rows, ids, "per_epoch", seed=4).epoch_rows(5), epochs[5])


def test_first_all_and_auto_rules():
    ids = torch.tensor([2, 0, 2, 1, 0])
    rows = torch.tensor([40, 11, 12, 30, 31])  # the first (lowest) row of image 2 is 12, of image 0 is 11
    first = CaptionSampler(rows, ids, "first", seed=0)
    assert first.rows_per_epoch == 3
    for epoch in range(3):
        assert sorted(first.epoch_rows(epoch).tolist()) == [11, 12, 30]
    every = CaptionSampler(rows, ids, "all", seed=0)
    assert every.rows_per_epoch == 5 and sorted(every.epoch_rows(0).tolist()) == [11, 12, 30, 31, 40]
    # one caption per image: "auto" visits every row in the order "all" always had
    single = CaptionSampler(torch.arange(6), torch.arange(6), "auto", seed=1)
    generator = torch.Generator().manual_seed(1 * 100003 + 2)
    assert single.sampling == "all" and torch.equal(single.epoch_rows(2), torch.randperm(6, generator=generator))
    with pytest.raises(
        ValueError, match=r"caption_sampling must be one of \('auto', 'per_epoch', 'first', 'all'\), got 'one'"
    ):
        CaptionSampler(rows, ids, "one", seed=0)
    with pytest.raises(ValueError, match=r"caption_sampling must be one of .* got 'random'"):
        AlignmentArguments(caption_sampling="random")
    with pytest.raises(ValueError, match=r"mask_same_image must be True or False, got 'yes'"):
        AlignmentArguments(mask_same_image="yes")


# ---------------------------------------------------------------------------------------------- no negatives
def one_image_cache(rows=12, images=1):
    """`rows` captions spread over `images` images (ids 7, 8, ...), with distinct text features."""
    task = make_paired_task(n=rows, n_vision_layers=1, n_text_layers=1, seed=5)
    owner = torch.arange(rows) % images
    return features_from_tensors({0: task.vision[0][owner]}, {0: task.text[0]}, image_id=7 + owner)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        # every pair of every batch is a same-image pair: the masked InfoNCE was exactly 0 at every step
        (
            dict(caption_sampling="all"),
            r"12 training row\(s\) of 1 distinct `image_id` value\(s\), and mask_same_image=True keeps captions of "
            r"one image from being each other's negatives",
        ),
        # one caption per image per epoch: one row per epoch, a batch of one pair
        (dict(), r"caption_sampling='per_epoch' visits 1 row per epoch \(12 training row\(s\) of 1 distinct"),
    ],
)
def test_training_pairs_without_negatives_are_refused_before_training(tmp_path, options, message):
    model = AlignerModel.from_feature_dims(64, 48, projection_dim=8)
    before = {k: v.clone() for k, v in model.aligner_state_dict().items()}
    args = AlignmentArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, eval_fraction=0.0, **options
    )
    with pytest.raises(ValueError, match=r"the training pairs give no row a negative, .*: " + message):
        train(model, one_image_cache(), args)
    assert os.listdir(tmp_path) == []  # refused before init, training, checkpoints or a saved aligner
    for key, value in model.aligner_state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_batch_of_one_pair_is_refused_and_two_images_or_no_masking_train():
    args = dict(max_steps=2, eval_fraction=0.0, caption_sampling="all", learning_rate=1e-2)
    with pytest.raises(ValueError, match=r"no row a negative, .*: a batch holds 1 pair \(per_device_train_batch_size"):
        train(
            AlignerModel.from_feature_dims(64, 48, projection_dim=8),
            one_image_cache(images=4),
            AlignmentArguments(per_device_train_batch_size=1, **args),
        )
    # two images, or captions of one image as each other's negatives: a real, positive loss
    for images, mask in ((2, True), (1, False)):
        result = train(
            AlignerModel.from_feature_dims(64, 48, projection_dim=8),
            one_image_cache(images=images),
            AlignmentArguments(per_device_train_batch_size=12, logging_steps=1, mask_same_image=mask, **args),
        )
        assert result.training_loss > 0.1


def test_check_negatives_counts():
    ids = torch.tensor([3, 3, 3, 5])
    CaptionSampler(torch.arange(4), ids, "all", seed=0).check_negatives(2, masked=True)  # images 3 and 5
    with pytest.raises(ValueError, match=r"3 training row\(s\) of 1 distinct `image_id` value\(s\), and mask"):
        CaptionSampler(torch.arange(3), ids[:3], "all", seed=0).check_negatives(64, masked=True)
    CaptionSampler(torch.arange(3), ids[:3], "all", seed=0).check_negatives(64, masked=False)  # rows as negatives


# ---------------------------------------------------------------------------------------------- bad rows
@pytest.mark.parametrize("where", ["memory", "streamed", "tokens read per batch"])
def test_a_bad_validation_row_is_named_by_its_cache_row(tmp_path, monkeypatch, where):
    task = make_paired_task(n=60, vision_dim=6, text_dim=5, n_vision_layers=1, n_text_layers=1, seed=2)
    text = task.text[0]
    tokens = where == "tokens read per batch"

    def cache_of(vision):
        if not tokens:
            return features_from_tensors({0: vision}, {0: text})
        return features_from_tensors(
            {0: vision[:, 0]},
            {0: text},
            vision_tokens={0: vision},
            text_tokens={0: text[:, None, :]},
            text_mask=torch.ones(60, 1, dtype=torch.bool),
        )

    vision = task.vision[0][:, None, :].repeat(1, 3, 1) if tokens else task.vision[0].clone()
    if tokens:
        model = AlignerModel.from_feature_dims(6, 5, method="token_relative", num_anchors=2)
        monkeypatch.setattr(hf_align.training.batches, "_available_memory", lambda: 0)  # not preloaded: read per batch
    else:
        model = AlignerModel.from_feature_dims(6, 5, projection_dim=4)
    # The features trained on are a selection of the cache (here its rows in reverse), as a split or subset is.
    reverse = list(range(59, -1, -1))
    _, eval_rows = training_module._validation_split(features_for(model, cache_of(vision).select(reverse)), 0.2, 0)
    bad = int(eval_rows[-2])  # row of the features given; len(eval_rows) - 2 inside the validation split
    vision[59 - bad, ..., 0] = float("inf")
    cache_of(vision).save_to_disk(str(tmp_path / "cache"))
    given = datasets.load_from_disk(str(tmp_path / "cache")).select(reverse)
    args = AlignmentArguments(
        max_steps=2, per_device_train_batch_size=8, eval_fraction=0.2, stream_features=where == "streamed"
    )
    # Before, only the row of the features given was named: the cache row was left to be worked out.
    with pytest.raises(
        ValueError,
        match=rf"NaN or Inf in vision_features of 1 row\(s\), e.g. rows \[{bad}\] of the features given "
        rf"\(rows \[{59 - bad}\] of the cache they were selected from\); re-extract",
    ):
        train(model, given, args)


@pytest.mark.parametrize("sampling", ["auto", "all"])
def test_training_batches_follow_caption_sampling_and_carry_image_ids(sampling, monkeypatch):
    cache, _ = multi_caption_cache()
    seen = []
    fetch = BatchSource.fetch

    def recording(self, indices, **kwargs):
        batch = fetch(self, indices, **kwargs)
        seen.append((self.image_ids[indices.cpu()].clone(), batch.get("image_ids")))
        return batch

    monkeypatch.setattr(BatchSource, "fetch", recording)
    model = AlignerModel.from_feature_dims(64, 48, projection_dim=8)
    args = AlignmentArguments(
        max_steps=6, per_device_train_batch_size=16, eval_fraction=0.0, caption_sampling=sampling, init_samples=8
    )
    result = train(model, cache, args)
    train_batches = seen[1:]  # the first fetch is init_from_data's
    assert len(train_batches) == 6 and result.global_step == 6
    per_image = [len(set(ids.tolist())) == len(ids) for ids, _ in train_batches]
    if sampling == "auto":  # per_epoch: 60 images = 4 batches of 16 (the last of 12), no image twice in one
        assert all(per_image)
        assert [len(ids) for ids, _ in train_batches] == [16, 16, 16, 12, 16, 16]
        assert sorted(torch.cat([ids for ids, _ in train_batches[:4]]).tolist()) == list(range(1000, 1060))
        assert all(sent is None for _, sent in train_batches)  # nothing to mask: no mask is built
    else:  # every caption row: batches that do hold several captions of one image
        assert not all(per_image)
        assert all(len(ids) == 16 for ids, _ in train_batches)
        for ids, sent in train_batches:
            assert torch.equal(sent.cpu(), ids)  # mask_same_image: the batch carries its rows' image ids
    seen.clear()
    args = AlignmentArguments(
        max_steps=2, per_device_train_batch_size=16, caption_sampling="all", mask_same_image=False
    )
    train(model, cache, args)
    assert len(seen) == 5 and all(sent is None for _, sent in seen)  # init, 2 training, 2 validation batches


# ---------------------------------------------------------------------------------------------- validation
def test_validation_reports_every_term_at_full_weight_with_masking():
    cache, _ = multi_caption_cache(n_images=30)
    torch.manual_seed(0)
    model = AlignerModel.from_feature_dims(64, 48, projection_dim=8, structure_weight=4.0, structure_warmup_steps=1000)
    view = features_for(model, cache)
    source = BatchSource(view)
    rows = torch.arange(len(view))
    args = AlignmentArguments(per_device_eval_batch_size=40)  # mask_same_image=True by default
    reg = model.regularizers["structure"]
    metrics = []
    for clock in (1, 900):
        reg.steps_done.fill_(clock)
        metrics.append(evaluate_on_rows(model, source, rows, args))
    scheduled = [m.pop("eval_loss_scheduled") for m in metrics]
    assert metrics[0] == metrics[1]  # the warm-up does not move the validation loss
    m = metrics[0]
    # ... but the loss at the scheduled weight (the authors' validation figure) follows it
    for clock, value in zip((1, 900), scheduled):
        assert value == pytest.approx(m["eval_infonce"] + clock / 1000 * m["eval_structure"], rel=1e-6)
    assert m["eval_loss"] == pytest.approx(m["eval_infonce"] + m["eval_structure"], rel=1e-6)
    # by hand: batches of 40 rows, each term weighted by its batch's rows, same-image pairs masked, λ in full
    sums = {"infonce": 0.0, "structure": 0.0}
    vision, text, ids = source.vision, source.text, source.image_ids
    for start in range(0, len(rows), 40):
        part = slice(start, start + 40)
        out = model.eval()(vision_features=vision[part], text_features=text[part])
        n = len(out.image_embeds)
        sums["infonce"] += n * hf_align.functional.symmetric_infonce(out.logits_per_image, ids[part]).item()
        raw = 0.5 * (
            hf_align.functional.structure_regularizer(vision[part], out.image_embeds, image_ids=ids[part])
            + hf_align.functional.structure_regularizer(text[part], out.text_embeds, image_ids=ids[part])
        )
        sums["structure"] += n * 4.0 * raw.item()
    assert m["eval_infonce"] == pytest.approx(sums["infonce"] / len(rows), rel=1e-5)
    assert m["eval_structure"] == pytest.approx(sums["structure"] / len(rows), rel=1e-5)
    unmasked = evaluate_on_rows(model, source, rows, dataclasses.replace(args, mask_same_image=False))
    assert unmasked["eval_infonce"] > m["eval_infonce"]
    assert unmasked["eval_mean_R@1"] == m["eval_mean_R@1"]  # retrieval does not depend on the loss masking


def test_training_log_keeps_the_warmup_weight_and_best_model_can_use_a_term():
    cache, _ = multi_caption_cache(n_images=40)
    model = AlignerModel.from_feature_dims(64, 48, projection_dim=8, structure_weight=10.0, structure_warmup_steps=1000)
    args = AlignmentArguments(
        max_steps=4,
        per_device_train_batch_size=16,
        eval_steps=2,
        logging_steps=2,
        eval_fraction=0.25,
        metric_for_best_model="eval_infonce",
    )
    assert not args.greater_is_better and AlignmentArguments(metric_for_best_model="eval_mean_R@1").greater_is_better
    result = train(model, cache, args)
    logs = [h for h in result.history if "loss_structure" in h]
    evals = [h for h in result.history if "eval_structure" in h]
    assert len(logs) == 2 and len(evals) == 2
    # step 2 of a 1000-step warm-up trains with 2/1000 of λ; validation scores the same term at full λ
    assert logs[0]["loss_structure"] < 0.01 * evals[0]["eval_structure"]
    best = min(evals, key=lambda h: h["eval_infonce"])
    assert model.config.training_summary["best_step"] == best["step"]


# ---------------------------------------------------------------------------------------------- optimiser, schedule
def test_adamw_settings_reach_the_optimizer(monkeypatch):
    built = []

    def recording(params, args):
        built.append(build_optimizer(params, args))
        return built[-1]

    monkeypatch.setattr(training_module, "build_optimizer", recording)
    model = AlignerModel.from_feature_dims(64, 48, projection_dim=8)
    args = AlignmentArguments(
        max_steps=1,
        per_device_train_batch_size=32,
        eval_fraction=0.0,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-6,
        weight_decay=1e-4,
    )
    train(model, make_paired_task(64, seed=0).to_features(), args)
    group = built[0].param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.95), 1e-6, 1e-4)
    with pytest.raises(ValueError, match=r"adam_beta2 must be in \[0(\.0)?, 1(\.0)?\), got 1.0"):
        AlignmentArguments(adam_beta2=1.0)
    with pytest.raises(ValueError, match=r"adam_epsilon must be in \(0(\.0)?, .*got 0"):
        AlignmentArguments(adam_epsilon=0)


def test_lr_scheduler_kwargs_shape_the_schedule():
    model = AlignerModel.from_feature_dims(64, 48, projection_dim=8)
    args = AlignmentArguments(
        max_steps=8,
        per_device_train_batch_size=32,
        eval_fraction=0.0,
        logging_steps=1,
        learning_rate=0.01,
        lr_scheduler_kwargs={"num_cycles": 1.0},  # a full cosine period: down to 0 at step 4, back up at step 8
    )
    result = train(model, make_paired_task(64, seed=0).to_features(), args)
    rates = [h["learning_rate"] for h in result.history if "learning_rate" in h]
    expected = [0.01 * 0.5 * (1 + math.cos(2 * math.pi * step / 8)) for step in range(1, 9)]
    assert rates == pytest.approx(expected, abs=1e-9)
    assert AlignmentArguments(lr_scheduler_kwargs='{"num_cycles": 2}').lr_scheduler_kwargs == {"num_cycles": 2}
    assert (
        AlignmentArguments().lr_scheduler_kwargs == {}
        and "lr_scheduler_kwargs" not in AlignmentArguments().non_default()
    )
    with pytest.raises(
        ValueError,
        match=r"lr_scheduler_kwargs has \['cycles'\], which lr_scheduler_type='cosine' does not take; "
        r"it takes \['num_cycles'\]",
    ):
        AlignmentArguments(lr_scheduler_kwargs={"cycles": 2})
    with pytest.raises(ValueError, match=r"lr_scheduler_type='constant' does not take; it takes none"):
        AlignmentArguments(lr_scheduler_type="constant", lr_scheduler_kwargs={"num_cycles": 2})
    with pytest.raises(ValueError, match=r"lr_scheduler_kwargs must be a JSON object, got '\{num_cycles: 2\}'"):
        AlignmentArguments(lr_scheduler_kwargs="{num_cycles: 2}")
    with pytest.raises(ValueError, match=r"lr_scheduler_kwargs must be a dict \(or a JSON object\), got \[1, 2\]"):
        AlignmentArguments(lr_scheduler_kwargs=[1, 2])


def test_a_yaml_recipe_sets_the_new_training_options(tmp_path):
    recipe = tmp_path / "structure.yaml"
    recipe.write_text(
        "vision_model: facebook/dinov2-large\n"
        "text_model: sentence-transformers/all-roberta-large-v1\n"
        "dataset: coco\n"
        "adam_beta2: 0.95\n"
        "weight_decay: 0.0001\n"
        "lr_scheduler_type: cosine\n"
        "lr_scheduler_kwargs:\n"
        "  num_cycles: 10.5\n"
        "caption_sampling: first\n"
        "mask_same_image: false\n"
    )
    _, _, args = parse_command_args(COMMANDS["train"].argument_classes, [str(recipe)])
    assert args.lr_scheduler_kwargs == {"num_cycles": 10.5}
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay) == (0.9, 0.95, 1e-4)
    assert args.caption_sampling == "first" and args.mask_same_image is False
    # flags after the recipe override it, the mapping as the JSON a flag carries
    _, _, args = parse_command_args(
        COMMANDS["train"].argument_classes,
        [str(recipe), "--lr_scheduler_kwargs", '{"num_cycles": 2}', "--mask_same_image", "true"],
    )
    assert args.lr_scheduler_kwargs == {"num_cycles": 2} and args.mask_same_image is True
