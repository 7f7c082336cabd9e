"""Out-of-the-box training (issue 22): the batch and the run's length follow the data, early stopping on a validation
retrieval metric restores the best weights, the choice is logged in one line and summed up on `TrainingResult`,
STRUCTURE warms up over a share of the run, layer selection weighs the encoder's own pooled embedding, asif takes
every training pair as an anchor, and a saved aligner tells sentence-transformers its width."""

import logging

import numpy as np
import pytest
import torch

import hf_align
from hf_align import AlignerModel, AlignmentArguments, train
from hf_align.commands.arguments import DataArguments, ModelArguments
from hf_align.commands.cli import parse_command_args
from hf_align.features import extract_features, features_for, features_from_tensors
from hf_align.methods.asif import MAX_AUTO_ANCHORS
from hf_align.regularizers.structure import FALLBACK_WARMUP_STEPS, StructureConfig, StructureRegularizer
from hf_align.testing import digits_dataset, make_paired_task, save_tiny_vision_encoder
from hf_align.training.arguments import auto_batch_size, plan_training
from hf_align.training.layer_selection import resolve_auto_layers


# ------------------------------------------------------------------------------------------------ the plan
@pytest.mark.parametrize(
    "rows, batch, steps_per_epoch, total_steps, eval_steps",
    [
        # 1,000 / 4 = 250 -> 128; ⌈1000/128⌉ = 8 steps an epoch; 1000 / 8 = 125 epochs, capped at 100 -> 800 steps
        (1_000, 128, 8, 800, 40),
        # 10,000 / 4 = 2,500 -> 2048; ⌈10000/2048⌉ = 5; 1000 / 5 = 200 epochs, capped at 100 -> 500 steps
        (10_000, 2048, 5, 500, 25),
        # 100,000 / 4 = 25,000 -> 16,384, capped at 4096; ⌈100000/4096⌉ = 25; 1000 / 25 = 40 epochs -> 1000 steps
        (100_000, 4096, 25, 1000, 50),
    ],
)
def test_defaults_scale_with_the_training_rows(rows, batch, steps_per_epoch, total_steps, eval_steps):
    plan = plan_training(AlignmentArguments(), rows)
    assert (plan.batch_size, plan.steps_per_epoch, plan.total_steps) == (batch, steps_per_epoch, total_steps)
    assert plan.eval_steps == eval_steps == total_steps // 20  # 20 evaluations a run
    assert plan.early_stopping_patience == 5 and plan.metric_for_best_model == "eval_rsum"
    assert plan.auto == ("batch", "length", "early stopping")
    # two processes share the global batch
    assert plan_training(AlignmentArguments(), rows, world=2).batch_size == batch // 2


def test_auto_batch_size_edges():
    assert [auto_batch_size(n) for n in (1, 20, 32, 200, 1293, 16_384, 10**7)] == [1, 20, 32, 32, 256, 4096, 4096]
    with pytest.raises(ValueError, match=r"rows must be a positive int, got 0"):
        auto_batch_size(0)


def test_given_settings_are_kept_and_no_validation_means_no_early_stopping():
    # the quickstart's old recipe on its 1,293 training rows: ⌈1293/256⌉ = 6 steps an epoch, one evaluation each
    recipe = AlignmentArguments(num_train_epochs=40, per_device_train_batch_size=256, early_stopping_patience=0)
    plan = plan_training(recipe, 1293)
    assert (plan.batch_size, plan.total_steps, plan.eval_steps, plan.early_stopping_patience) == (256, 240, 6, 0)
    assert plan.auto == ()
    alone = plan_training(AlignmentArguments(), 1293, has_validation=False)
    assert alone.early_stopping_patience == 0 and alone.auto == ("batch", "length", "no early stopping")
    assert plan_training(AlignmentArguments(max_steps=7), 1293).total_steps == 7
    # given epochs are evaluated each epoch: the patience is a quarter of the 40 evaluations, not 5 of them
    epochs = plan_training(AlignmentArguments(num_train_epochs=40, per_device_train_batch_size=256), 1293)
    assert (epochs.total_steps, epochs.eval_steps, epochs.early_stopping_patience) == (240, 6, 10)
    assert "no validation split (eval_fraction=0): no early stopping" in alone.describe(1293, 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"early_stopping_patience": -1}, r"early_stopping_patience must be None \(automatic\), 0 .* got -1"),
        ({"per_device_train_batch_size": 0}, r"per_device_train_batch_size must be None \(automatic\) or a positive"),
        ({"num_train_epochs": 0.0}, r"give num_train_epochs > 0, max_steps > 0 or neither"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AlignmentArguments(**kwargs)


def test_the_train_command_parses_to_the_same_defaults():
    _, _, args = parse_command_args(
        (ModelArguments, DataArguments, AlignmentArguments),
        ["--vision_model", "v", "--text_model", "t", "--dataset", "d", "--output_dir", "out"],
    )
    assert args.non_default() == {"output_dir": "out"}
    assert args.per_device_train_batch_size is None and args.num_train_epochs is None


# ------------------------------------------------------------------------------------------------ a run
@pytest.fixture(scope="module")
def small_cache():
    return make_paired_task(n=200, seed=0).to_features()


def test_a_default_run_logs_its_plan_and_sums_itself_up(small_cache, caplog):
    model = AlignerModel.from_feature_dims(64, 48, projection_dim=16)
    with caplog.at_level(logging.WARNING, logger="hf_align.training.loop"):
        result = train(model, small_cache, AlignmentArguments(mixed_precision="no"))
    # 200 pairs: 20 validation images, 180 training rows -> 180 / 4 = 45 -> batch 32, ⌈180/32⌉ = 6 steps an epoch,
    # 100 epochs = 600 steps, evaluated every 600 / 20 = 30 steps
    lines = [r.getMessage() for r in caplog.records if r.name == "hf_align.training.loop"]
    assert lines[0] == (
        "training 600 steps (100 epochs of 6 steps) at batch 32 on 180 rows (automatic: batch, length, early "
        "stopping); best weights by eval_rsum on 20 validation rows, evaluated every 30 steps, early stopping on "
        "eval_rsum (patience 5 evaluations)"
    )
    assert lines[-1] == result.summary()
    evals = [h for h in result.history if "eval_rsum" in h]
    assert [h["step"] for h in evals] == list(range(30, result.global_step + 1, 30))
    scores = [h["eval_rsum"] for h in evals]
    for h in evals:  # rsum: R@1 + R@5 + R@10 of both directions
        recalls = [h[f"eval_{d}_R@{k}"] for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
        assert h["eval_rsum"] == pytest.approx(sum(recalls), abs=1e-9) and 0 < h["eval_rsum"] <= 600
    best = int(np.argmax(scores))  # the first of equal bests: a later tie is no improvement
    assert result.best_step == evals[best]["step"] and result.best_metric == scores[best]
    assert result.total_steps == 600 and result.metric_for_best_model == "eval_rsum"
    # early stopping fires after 5 evaluations (150 steps) without a better score, and only then
    assert result.early_stopped == (result.global_step < 600)
    if result.early_stopped:
        assert result.global_step == result.best_step + 5 * 30
    # the kept weights are the best step's: evaluated again, they give its score
    assert result.metrics["eval_rsum"] == pytest.approx(result.best_metric, abs=1e-9)
    assert f"best eval_rsum {result.best_metric:.4g} at step {result.best_step}" in result.summary()


def test_best_weights_follow_the_loss_with_a_regularizer_and_retrieval_without(small_cache):
    # "auto": with STRUCTURE the restore follows eval_loss (every term at full weight, the STRUCTURE authors'
    # criterion), and on this run the step eval_rsum would pick is another one (measured: rsum step 12, loss step 40);
    # without a regulariser it follows eval_rsum
    torch.manual_seed(0)
    model = AlignerModel.from_feature_dims(64, 48, method="mlp", structure_weight=10.0)
    args = AlignmentArguments(max_steps=40, eval_steps=4, early_stopping_patience=0, mixed_precision="no")
    assert args.metric_for_best_model == "auto" and args.greater_is_better is None
    result = train(model, small_cache, args)
    evals = [h for h in result.history if "eval_loss" in h]
    by_rsum = evals[int(np.argmax([h["eval_rsum"] for h in evals]))]["step"]
    by_loss = evals[int(np.argmin([h["eval_loss"] for h in evals]))]["step"]
    assert result.metric_for_best_model == "eval_loss" and result.best_step == by_loss != by_rsum
    assert result.metrics["eval_loss"] == pytest.approx(result.best_metric, abs=1e-6)
    plain = train(AlignerModel.from_feature_dims(64, 48, method="mlp"), small_cache, args)
    plain_evals = [h for h in plain.history if "eval_rsum" in h]
    assert plain.metric_for_best_model == "eval_rsum"
    assert plain.best_step == plain_evals[int(np.argmax([h["eval_rsum"] for h in plain_evals]))]["step"]


def test_structure_warms_up_over_the_whole_run(small_cache):
    model = AlignerModel.from_feature_dims(64, 48, structure_weight=10.0)
    result = train(model, small_cache, AlignmentArguments(max_steps=50, eval_fraction=0.0, mixed_precision="no"))
    structure = model.regularizers["structure"]
    assert result.global_step == 50 and structure.training_length == 50
    # batch k used λ·(k − 1)/50: the last one 9.8; after the run the ramp has reached the full weight
    assert structure.warmup_steps == 50 and structure.current_weight() == 10.0


def test_structure_warm_up_rules():
    regularizer = StructureRegularizer(StructureConfig())
    assert regularizer.config.warmup_steps == "auto" and regularizer.warmup_steps == FALLBACK_WARMUP_STEPS == 1000
    regularizer.set_training_length(600)
    assert regularizer.warmup_steps == 600
    regularizer.steps_done.fill_(15)
    assert regularizer.current_weight() == pytest.approx(10.0 * 15 / 600)
    regularizer.set_training_length(3)  # a tiny run ramps over its calls
    assert regularizer.warmup_steps == 3
    assert StructureRegularizer(StructureConfig(warmup_steps=200)).warmup_steps == 200
    assert StructureConfig(preset="L1").warmup_steps == 1000  # the authors' configurations keep their schedule
    with pytest.raises(ValueError, match=r"structure warmup_steps must be an int >= 0 or 'auto', got 'soon'"):
        StructureConfig(warmup_steps="soon")
    with pytest.raises(ValueError, match=r"structure training length must be a positive int .* got 0"):
        regularizer.set_training_length(0)


def test_structure_weight_auto_is_the_authors_for_every_method(tmp_path):
    def weight(method, **settings):
        model = AlignerModel.from_feature_dims(64, 48, method=method, regularizers={"structure": settings})
        return model, model.regularizers["structure"].weight

    assert weight("linear")[1] == weight("mlp")[1] == weight("codebook")[1] == 10.0
    assert weight("mlp", weight=1.0)[1] == 1.0 and weight("mlp", preset="L1")[1] == 10.0  # given / the authors'
    model, _ = weight("mlp")
    assert model.config.regularizers == {"structure": {}}  # "auto" is what is saved, and what reloads as 10
    model.save_pretrained(str(tmp_path / "mlp"))
    reloaded = AlignerModel.from_pretrained(str(tmp_path / "mlp"), load_encoders=False)
    assert reloaded.regularizers["structure"].weight == 10.0
    with pytest.raises(ValueError, match=r"structure weight must be a float >= 0 or 'auto', got 'heavy'"):
        StructureConfig(weight="heavy")


# ------------------------------------------------------------------------------------------------ layer selection
def _with_pooled_embedding(task, pooled: torch.Tensor):
    cache = task.to_features()
    return cache.add_column("vision_pooler_output", pooled.numpy().tolist())


def test_layer_selection_weighs_the_pooled_embedding_and_can_choose_it():
    task = make_paired_task(n=500, n_vision_layers=3, n_text_layers=2, shared_layers=(1, 1), seed=0)
    # the pooled embedding carries the shared latent more cleanly than hidden state 1 (a linear map of it)
    pooled = task.vision[1] @ torch.randn(64, 40, generator=torch.Generator().manual_seed(1))
    cache = _with_pooled_embedding(task, pooled)
    report = hf_align.select_layers(cache, n_samples=400, seed=0)
    assert report.vision_layers == [0, 1, 2, "pooler_output"] and report.vision_hidden_sizes == [64, 64, 64, 40]
    scores = report.score_matrix
    assert report.summary()["vision_layers"] == [0, 1, 2, "pooler_output"]
    # both the layer and the pooled embedding are scored; the best of the two wins, whichever it is
    layer_score, pooled_score = scores[1, 1], scores[3, 1]
    assert min(layer_score, pooled_score) > 0.3 and scores[[0, 2]].max() < 0.06
    assert report.best_pair == ((1, 1) if layer_score >= pooled_score else ("pooler_output", 1))

    # without hidden state 1 only the pooled embedding shares the latent: selection chooses it, the model reads it
    model = AlignerModel.from_feature_dims(64, 48, projection_dim=16)
    model.config.vision_layer = model.config.text_layer = "auto"
    report = resolve_auto_layers(model, cache.remove_columns("vision_layer_1"), n_samples=400)
    assert report.best_pair == ("pooler_output", 1)
    config = model.config
    assert (config.vision_source, config.vision_layer, config.vision_hidden_size) == ("pooler_output", -1, 40)
    assert config.tap("vision").describe() == "pooler_output" and model.aligner.vision_head.in_features == 40
    assert config.training_summary["layer_selection"]["best_vision_layer"] == "pooler_output"
    view = features_for(model, cache)
    assert torch.equal(torch.tensor(view[:3]["vision_features"]), pooled[:3])


def test_an_auto_efficientnet_cache_holds_the_pooled_embedding(tmp_path, minilm):
    vision = save_tiny_vision_encoder(str(tmp_path / "efficientnet"), "efficientnet")
    model = AlignerModel.from_encoders(vision, minilm, vision_layer="auto", projection_dim=8)
    features = extract_features(model, model.processor, digits_dataset(6), cache_dir=str(tmp_path / "cache"))
    layers = [c for c in features.column_names if c.startswith("vision_layer_")]
    assert "vision_pooler_output" in features.column_names and len(layers) == model.config.vision_num_layers
    expected = model.vision_outputs(model.processor(images=digits_dataset(6)[:2]["image"])["pixel_values"])
    torch.testing.assert_close(
        torch.tensor(features[:2]["vision_pooler_output"]), expected.pooler_output.flatten(1), atol=1e-5, rtol=1e-5
    )
    report = resolve_auto_layers(model, features, n_samples=6)
    assert "pooler_output" in report.vision_layers


# ------------------------------------------------------------------------------------------------ asif
def test_asif_takes_every_training_pair_as_an_anchor(small_cache, tmp_path):
    model = AlignerModel.from_feature_dims(64, 48, method="asif")
    assert model.config.method_config["num_anchors"] == "auto"
    result = train(model, small_cache, AlignmentArguments(output_dir=str(tmp_path / "asif"), mixed_precision="no"))
    assert result.global_step == result.total_steps == 0
    assert result.summary() == "set up without training steps (a training-free method); no validation score kept"
    # 200 pairs, 20 held out for validation: 180 anchors
    assert model.aligner.config.num_anchors == model.aligner.embed_dim == 180
    assert model.config.method_config["num_anchors"] == 180 and model.aligner.vision_anchors.shape == (180, 64)
    assert model.config.projection_dim == model.similarity.dim == 180
    reloaded = AlignerModel.from_pretrained(str(tmp_path / "asif"), load_encoders=False)
    features = torch.tensor(small_cache[:5]["vision_layer_2"])
    torch.testing.assert_close(
        reloaded.get_image_features(vision_features=features), model.get_image_features(vision_features=features)
    )
    assert MAX_AUTO_ANCHORS == 10_000


def test_asif_explicit_anchors_above_the_data_stay_an_error(small_cache):
    model = AlignerModel.from_feature_dims(64, 48, method="asif", num_anchors=500)
    with pytest.raises(ValueError, match=r"asif wants num_anchors=500 paired anchors but init_from_data got only 180"):
        train(model, small_cache, AlignmentArguments(mixed_precision="no"))
    model = AlignerModel.from_feature_dims(64, 48, method="asif", topk=300)
    with pytest.raises(ValueError, match=r"asif: topk=300 must not exceed num_anchors, which 'auto' makes 180"):
        train(model, small_cache, AlignmentArguments(mixed_precision="no"))


def test_the_step_count_of_a_plan_matches_the_run():
    cache = features_from_tensors({0: torch.randn(90, 4)}, {0: torch.randn(90, 3)})
    model = AlignerModel.from_feature_dims(4, 3, projection_dim=2)
    result = train(model, cache, AlignmentArguments(eval_fraction=0.0, mixed_precision="no"))
    # 90 rows: 90 / 4 = 22 -> 32 (the floor), ⌈90/32⌉ = 3 steps an epoch, 100 epochs, no validation
    assert (result.global_step, result.total_steps, result.best_step, result.early_stopped) == (300, 300, None, False)
    assert result.summary().endswith("no validation split: kept the last weights; ran to the end")
    assert result.best_metric is None and result.metrics == {}


# ------------------------------------------------------------------------------------------------ sentence-transformers
def test_a_saved_aligner_tells_sentence_transformers_its_width(tiny_vit, minilm, tmp_path):
    from sentence_transformers import SentenceTransformer

    AlignerModel.from_encoders(tiny_vit, minilm, projection_dim=24).save_pretrained(str(tmp_path / "aligner"))
    encoder = SentenceTransformer(str(tmp_path / "aligner"), device="cpu")
    assert encoder.get_embedding_dimension() == 24
    with pytest.warns(FutureWarning, match="renamed to `get_embedding_dimension`"):
        assert encoder.get_sentence_embedding_dimension() == 24
    assert encoder.encode(["a handwritten digit three"]).shape == (1, 24)


# ------------------------------------------------------------------------------------------------ real towers
@pytest.mark.slow  # extracts 480 digits through the real EfficientNet-Lite0 (224 px) and MiniLM: minutes on a CPU
def test_defaults_on_a_small_real_cache_reach_the_swept_floor(tmp_path):
    from hf_align.evaluation import evaluate_zero_shot
    from hf_align.experiments.quickstart import CAPTION_TEMPLATES
    from hf_align.testing import DIGIT_NAMES, efficientnet_lite0_path, minilm_path

    data = digits_dataset(600, seed=1)
    split = data.train_test_split(test_size=0.2, seed=1)
    torch.manual_seed(1)
    model = AlignerModel.from_encoders(efficientnet_lite0_path(), minilm_path())
    features = extract_features(model, model.processor, split["train"], cache_dir=str(tmp_path / "cache"))
    result = train(model, features, AlignmentArguments(seed=1))
    metrics = evaluate_zero_shot(
        model, model.processor, split["test"], DIGIT_NAMES, templates=CAPTION_TEMPLATES[:1], label_column="label"
    )
    # 480 training digits (432 after validation): batch 64, 7 steps an epoch, at most 700 steps. Measured on
    # this split with seeds 1, 2, 3: 79.2, 79.2, 75.0 (1,437 digits: 92.0, docs/methods.md "Defaults")
    assert result.total_steps == 700 and result.best_step is not None
    assert metrics["top1"] >= 70.0


def test_aligner_trainer_announces_the_run_length_to_structure(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from hf_align.integrations.trainer import CardDataCallback

    model = AlignerModel.from_feature_dims(64, 48, structure_weight=10.0)
    state = TrainerState(max_steps=300, global_step=0)
    args = TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=2, report_to=[])
    CardDataCallback().on_train_begin(args, state, TrainerControl(), model=model)
    # 300 optimiser steps of 2 forward calls each: the warm-up is the 600 calls
    structure = model.regularizers["structure"]
    assert (structure.training_length, structure.warmup_steps) == (600, 600)


def test_the_cli_names_the_pooled_embedding_among_candidate_layers():
    from hf_align.commands.arguments import parse_layer_list

    assert parse_layer_list("vision_layers", "13, pooler_output") == [13, "pooler_output"]
    with pytest.raises(ValueError, match=r"vision_layers must be 'all' or comma-separated ints and pooled embeddings"):
        parse_layer_list("vision_layers", "13,pooled")


@pytest.mark.parametrize(
    "method, weight, expected",
    [
        ("linear", None, {"structure": {}}),
        ("mlp", 2.0, {"structure": {"weight": 2.0}}),
        ("sail", None, {"structure": {}}),  # a token method that pools a reference for STRUCTURE
        ("asif", None, {}),  # training-free: STRUCTURE would never apply
        ("csa", None, {}),
        ("token_relative", None, {}),  # tokens, no pooled reference
        ("asif", 2.0, {"structure": {"weight": 2.0}}),  # asked for explicitly: the model refuses it, with its reason
    ],
)
def test_the_quickstart_adds_structure_only_where_the_method_takes_it(method, weight, expected):
    from hf_align.experiments.quickstart import default_regularizers

    assert default_regularizers(method, weight) == expected
    if method == "asif" and weight is not None:
        with pytest.raises(ValueError, match=r"method 'asif' is training-free .* the regulariser\(s\) \['structure'\]"):
            AlignerModel.from_feature_dims(8, 8, method="asif", num_anchors=4, regularizers=expected)
