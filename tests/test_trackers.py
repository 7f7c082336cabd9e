"""`report_to`: train() logs its history to Accelerate trackers; tensorboard's event files are read back."""

import io
import math

import numpy as np
import pytest
import torch
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
from matplotlib.image import imread
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from hf_align import AlignerModel, AlignmentArguments, train
from hf_align.testing import make_paired_task
from hf_align.training.layer_selection import resolve_auto_layers


def read_events(output_dir):
    """Every scalar and image of the run's event files (train() logs under `<output_dir>/hf_align`)."""
    events = event_accumulator.EventAccumulator(str(output_dir / "hf_align"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def scalar_points(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


def history_points(history, key):
    return [(h["step"], pytest.approx(h[key], rel=1e-6)) for h in history if key in h]


def tracked_args(tmp_path, **kwargs):
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=64,
        logging_steps=2,
        mixed_precision="no",
        save_model=False,
        report_to=["tensorboard"],
    )
    settings.update(kwargs)
    return AlignmentArguments(**settings)


def test_loss_terms_learning_rate_temperature_and_evaluations_are_logged(tmp_path):
    torch.manual_seed(0)
    model = AlignerModel.from_feature_dims(64, 48, method="linear", projection_dim=16)
    result = train(
        model, make_paired_task(300, seed=0).to_features(), tracked_args(tmp_path, max_steps=6, eval_steps=3)
    )
    events = read_events(tmp_path)
    tags = set(events.Tags()["scalars"])
    assert {"loss", "loss_infonce", "learning_rate", "temperature", "epoch", "eval_loss", "eval_mean_R@1"} <= tags
    for tag in ("loss", "loss_infonce", "learning_rate", "temperature", "epoch"):
        points = scalar_points(events, tag)
        assert [step for step, _ in points] == [2, 4, 6], tag  # logging_steps=2 of 6 steps
        assert points == history_points(result.history, tag), tag
    for tag in ("eval_loss", "eval_mean_R@1", "eval_infonce"):
        assert [step for step, _ in scalar_points(events, tag)] == [3, 6], tag  # eval_steps=3
        assert scalar_points(events, tag) == history_points(result.history, tag), tag
    # Cosine schedule from the default 2e-3 over 6 steps without warm-up: lr(s) = 2e-3 · (1 + cos(π s / 6)) / 2.
    expected_lr = [2e-3 * (1 + math.cos(math.pi * s / 6)) / 2 for s in (2, 4, 6)]
    assert [v for _, v in scalar_points(events, "learning_rate")] == pytest.approx(expected_lr, rel=1e-6, abs=1e-12)
    # The temperature is fixed at the default τ = 0.05 (learnable_temperature=False): 1/exp(logit_scale) is τ.
    assert [v for _, v in scalar_points(events, "temperature")] == pytest.approx([0.05] * 3, rel=1e-6)
    # The loss is the mean over the logging window: it falls while the model learns the planted alignment.
    losses = [v for _, v in scalar_points(events, "loss")]
    assert losses[-1] < losses[0]


def test_learnable_temperature_is_logged_as_it_moves(tmp_path):
    torch.manual_seed(0)
    model = AlignerModel.from_feature_dims(64, 48, method="linear", projection_dim=16, learnable_temperature=True)
    args = tracked_args(tmp_path, max_steps=4, eval_fraction=0.0, learning_rate=0.05, lr_scheduler_type="constant")
    result = train(model, make_paired_task(300, seed=0).to_features(), args)
    points = scalar_points(read_events(tmp_path), "temperature")
    assert points == history_points(result.history, "temperature")
    # No validation split, so the last weights are kept: the last point is the trained scale's 1/exp.
    assert points[-1][1] == pytest.approx(math.exp(-model.logit_scale.item()), rel=1e-6)
    assert points[-1][1] != pytest.approx(0.05, rel=1e-3)


def test_codebook_run_logs_its_terms_and_perplexity(tmp_path):
    torch.manual_seed(0)
    model = AlignerModel.from_feature_dims(64, 48, method="codebook", projection_dim=16, num_codes=8)
    features = make_paired_task(400, n_clusters=8, seed=0).to_features()
    result = train(model, features, tracked_args(tmp_path, max_steps=4, eval_fraction=0.0))
    events = read_events(tmp_path)
    for tag in ("loss_codebook", "diag_codebook_perplexity", "diag_codebook_dead_codes"):
        points = scalar_points(events, tag)
        assert [step for step, _ in points] == [2, 4], tag
        assert points == history_points(result.history, tag), tag
    # Perplexity of the code use: between 1 (collapse) and num_codes (uniform use).
    assert all(1.0 <= value <= 8.0 for _, value in scalar_points(events, "diag_codebook_perplexity"))


def test_layer_selection_heatmap_is_logged_as_an_image(tmp_path):
    cache = make_paired_task(n=700, n_vision_layers=4, n_text_layers=3, shared_layers=(2, 0), seed=0).to_features()
    model = AlignerModel.from_feature_dims(64, 48, method="linear", projection_dim=16)
    model.config.vision_layer = model.config.text_layer = "auto"
    train(model, cache, tracked_args(tmp_path, max_steps=2, eval_fraction=0.0, per_device_train_batch_size=256))
    logged = read_events(tmp_path).Images("layer_selection")
    assert [event.step for event in logged] == [0]  # before the first step
    pixels = np.asarray(Image.open(io.BytesIO(logged[0].encoded_image_string)).convert("RGB"))
    # The same selection (train() seeds it with args.seed) plotted here gives the same picture, pixel for pixel.
    again = AlignerModel.from_feature_dims(64, 48, method="linear", projection_dim=16)
    again.config.vision_layer = again.config.text_layer = "auto"
    report = resolve_auto_layers(again, cache, seed=42)
    expected = (imread(report.plot(str(tmp_path / "heatmap.png")))[..., :3] * 255).round().astype(np.uint8)
    assert (logged[0].height, logged[0].width) == expected.shape[:2]
    np.testing.assert_array_equal(pixels, expected)


def test_no_trackers_no_event_files(tmp_path):
    model = AlignerModel.from_feature_dims(64, 48, method="linear", projection_dim=16)
    train(model, make_paired_task(200, seed=0).to_features(), tracked_args(tmp_path, max_steps=2, report_to=[]))
    assert not (tmp_path / "hf_align").exists()


def test_bad_report_to():
    installed = sorted(str(tracker) for tracker in get_available_trackers())
    with pytest.raises(ValueError, match=r"report_to has 'tensorbored', which is not an Accelerate tracker \(known: "):
        AlignmentArguments(output_dir="out", report_to=["tensorbored"])
    with pytest.raises(ValueError, match=r"report_to must be a list of Accelerate tracker names, got \[3\]"):
        AlignmentArguments(report_to=[3])
    with pytest.raises(ValueError, match=r"report_to has 'tensorboard', which writes its logs under output_dir; give"):
        AlignmentArguments(report_to=["tensorboard"])
    assert AlignmentArguments(output_dir="out", report_to="tensorboard").report_to == ["tensorboard"]
    missing = sorted(set(LOGGER_TYPE_TO_CLASS) - set(installed))
    if missing:  # a tracker Accelerate knows whose package this environment lacks
        expected = f"report_to has '{missing[0]}', but its package is not installed (installed trackers: "
        with pytest.raises(ValueError, match=expected.replace("(", r"\(")):
            AlignmentArguments(output_dir="out", report_to=[missing[0]])
