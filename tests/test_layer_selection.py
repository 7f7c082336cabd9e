"""Layer selection: recovers the planted layer pair, rows normalised before every score, report save/load/plot,
auto-layer resolution, CLI, bad input."""

import json

import pytest
import torch

import hf_align
from hf_align import AlignerModel
from hf_align.commands.cli import main
from hf_align.features import features_from_tensors
from hf_align.testing import make_paired_task
from hf_align.training.layer_selection import LayerSelectionReport, resolve_auto_layers

PLANTED = (2, 0)  # a non-last pair: vision hidden state 2 of 0..3, text hidden state 0 of 0..2


@pytest.fixture(scope="module")
def cache():
    task = make_paired_task(n=700, n_vision_layers=4, n_text_layers=3, shared_layers=PLANTED, seed=0)
    return task.to_features()


@pytest.mark.parametrize("metric", ["mutual_knn", "cka", "unbiased_cka"])
def test_recovers_the_planted_pair(cache, metric):
    report = hf_align.select_layers(cache, metric=metric, n_samples=600, seed=1)
    assert report.vision_layers == [0, 1, 2, 3] and report.text_layers == [0, 1, 2]
    assert report.best_pair == PLANTED
    assert report.n_samples == 600
    scores = report.score_matrix
    others = scores.copy()
    others[2, 0] = float("-inf")
    # every other layer encodes an independent nuisance latent: its cross-modal similarity is at chance
    assert scores[2, 0] > 0.3 and others.max() < 0.06
    if metric == "mutual_knn":
        assert report.k == 17  # rice: ⌈2 · 600^⅓⌉ = ⌈16.87⌉
        assert others.max() < 3 * 17 / 599  # chance overlap k / (n - 1)
    else:
        assert report.k is None


def test_scores_equal_the_pairwise_functions(cache):
    report = hf_align.select_layers(cache, metric="cka", n_samples=300, seed=0, vision_layers=[1, 2], text_layers=[0])
    rows = sorted(torch.randperm(len(cache), generator=torch.Generator().manual_seed(0))[:300].tolist())
    table = cache.select(rows).with_format("torch")[:]
    for i, v in enumerate([1, 2]):
        assert report.scores[i][0] == pytest.approx(
            hf_align.functional.cka(table[f"vision_layer_{v}"], table["text_layer_0"], normalize=True), rel=1e-9
        )


def _rescaled_rows_cache(seed=0):
    """Vision layer 0 = a; text layer 0 = a rotated, each row multiplied by a random positive scale (the same
    directions: the planted pair); text layer 1 = a + noise (a partial match with ordinary row norms)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(500, 32, generator=g)
    scales = torch.exp(1.5 * torch.randn(500, 1, generator=g))
    rotation, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    text = {0: (a @ rotation) * scales, 1: a + torch.randn(500, 32, generator=g)}
    return features_from_tensors({0: a, 1: torch.randn(500, 16, generator=g)}, text), a, scales


@pytest.mark.parametrize("metric", ["cka", "unbiased_cka"])
def test_cka_scores_row_normalised_features(metric):
    cache, a, scales = _rescaled_rows_cache()
    report = hf_align.select_layers(cache, metric=metric, n_samples=500)
    assert report.normalize is True and report.summary()["normalize"] is True
    # cka(a, a·s) with per-row scales s: exactly 1 once rows are normalised (a rotation changes nothing)
    assert report.scores[0][0] == pytest.approx(1.0, abs=1e-9)
    assert report.best_pair == (0, 0)
    raw = hf_align.select_layers(cache, metric=metric, n_samples=500, normalize=False)
    assert raw.normalize is False
    assert raw.scores[0][0] < 0.2  # measured 0.07 (cka) and 0.11 (unbiased): a few huge rows dominate
    assert raw.best_pair == (0, 1)  # raw rows let the noisy layer win
    score = getattr(hf_align.functional, metric)
    assert score(a, a * scales, normalize=True) == pytest.approx(1.0, abs=1e-9)
    assert score(a, a * scales) < 0.9


def test_mutual_knn_already_compares_directions():
    cache, _, _ = _rescaled_rows_cache()
    normalised = hf_align.select_layers(cache, n_samples=500)
    raw = hf_align.select_layers(cache, n_samples=500, normalize=False)
    assert normalised.scores == raw.scores and normalised.scores[0][0] == 1.0


def test_one_caption_per_image_is_sampled():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(40, 6, generator=g)
    # three captions per image: rows 3i, 3i+1, 3i+2 share image i
    cache = features_from_tensors(
        {0: images.repeat_interleave(3, 0)},
        {0: torch.randn(120, 5, generator=g)},
        image_id=torch.arange(40).repeat_interleave(3),
    )
    report = hf_align.select_layers(cache, n_samples=1000, k=3)
    assert report.n_samples == 40


def test_report_saves_loads_and_plots(cache, tmp_path):
    report = hf_align.select_layers(cache, n_samples=400, seed=3)
    path = tmp_path / "sub" / "report.json"
    report.save(str(path))
    payload = json.loads(path.read_text())
    assert payload["best_pair"] == list(PLANTED) and payload["metric"] == "mutual_knn" and payload["k"] == 15
    assert payload["normalize"] is True
    assert LayerSelectionReport.load(str(path)) == report
    # a report written before `normalize` existed: CKA scored raw rows then, mutual k-NN always normalised
    for metric, normalize in (("cka", False), ("mutual_knn", True)):
        old = {k: v for k, v in payload.items() if k != "normalize"}
        path.write_text(json.dumps({**old, "metric": metric}))
        assert LayerSelectionReport.load(str(path)).normalize is normalize
    png = report.plot(str(tmp_path / "heatmap.png"))
    with open(png, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_resolve_auto_layers_points_the_model_at_the_best_pair(cache):
    model = AlignerModel.from_feature_dims(64, 48, method="linear", projection_dim=16)
    model.config.vision_layer = model.config.text_layer = "auto"  # what from_encoders(..., "auto") records
    report = resolve_auto_layers(model, cache, n_samples=500, seed=0)
    assert (model.config.vision_layer, model.config.text_layer) == PLANTED
    summary = model.config.training_summary["layer_selection"]
    assert summary == json.loads(json.dumps(summary))  # JSON-able
    assert summary["metric"] == "mutual_knn" and summary["k"] == 16 and summary["n_samples"] == 500
    assert (summary["best_vision_layer"], summary["best_text_layer"]) == PLANTED
    assert summary["scores"] == report.scores
    assert resolve_auto_layers(model, cache) is None  # nothing left to choose


def test_widths_come_from_the_cache_and_a_fixed_layer_is_kept():
    task = make_paired_task(n=400, n_vision_layers=2, n_text_layers=2, shared_layers=(1, 0), vision_dim=24, seed=0)
    vision = {0: torch.randn(400, 8), 1: task.vision[1]}  # layer widths differ: 8 and 24
    cache = features_from_tensors(vision, task.text)
    model = AlignerModel.from_feature_dims(8, 48, method="linear", projection_dim=16)
    model.config.vision_layer = "auto"
    model.config.text_layer = 0
    report = resolve_auto_layers(model, cache, metric="unbiased_cka")
    assert report.text_layers == [0] and report.vision_layers == [0, 1]
    assert model.config.vision_layer == 1 and model.config.vision_hidden_size == 24
    assert model.aligner.vision_head.in_features == 24  # rebuilt for the wider layer
    out = model(vision_features=task.vision[1][:8], text_features=task.text[0][:8], return_loss=True)
    assert torch.isfinite(out.loss)


def test_train_resolves_auto_layers(cache):
    model = AlignerModel.from_feature_dims(64, 48, method="linear", projection_dim=16)
    model.config.vision_layer = model.config.text_layer = "auto"
    args = hf_align.AlignmentArguments(
        max_steps=3, per_device_train_batch_size=256, eval_fraction=0.0, mixed_precision="no"
    )
    hf_align.train(model, cache, args)
    assert (model.config.vision_layer, model.config.text_layer) == PLANTED
    assert model.config.training_summary["layer_selection"]["best_vision_layer"] == PLANTED[0]


def test_cli_writes_report_and_heatmap(cache, tmp_path, capsys):
    cache.save_to_disk(str(tmp_path / "cache"))
    out = tmp_path / "out"
    code = main(
        [
            "select-layers",
            "--features",
            str(tmp_path / "cache"),
            "--output_dir",
            str(out),
            "--n_samples",
            "300",
            "--metric",
            "cka",
            "--vision_layers",
            "1,2",
        ]
    )
    assert code == 0
    report = LayerSelectionReport.load(str(out / "layer_selection.json"))
    assert report.best_pair == PLANTED and report.vision_layers == [1, 2] and report.n_samples == 300
    assert (out / "layer_selection.png").read_bytes()[:4] == b"\x89PNG"
    assert '"best_vision_layer": 2' in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- bad input
def test_cache_without_the_requested_layers(cache):
    with pytest.raises(
        ValueError,
        match=r"vision_layers=\[2, 7\] asks for layers the feature cache does not hold: \[7\]; "
        r"pooled vision layers cached: \[0, 1, 2, 3\]",
    ):
        hf_align.select_layers(cache, vision_layers=[2, 7])
    with pytest.raises(ValueError, match=r"the feature cache holds no pooled text layers \(no text_layer_<l> columns"):
        hf_align.select_layers(cache.remove_columns(["text_layer_0", "text_layer_1", "text_layer_2"]))
    model = AlignerModel.from_feature_dims(64, 48, method="linear", projection_dim=16)
    model.config.vision_layer, model.config.text_layer = "auto", 5
    with pytest.raises(ValueError, match=r"text_layers=\[5\] asks for layers the feature cache does not hold"):
        resolve_auto_layers(model, cache)


def test_fewer_samples_than_k(cache):
    with pytest.raises(ValueError, match=r"k=50 neighbours need more than k samples .* only 30 were given"):
        hf_align.select_layers(cache.select(range(30)), k=50)


def test_other_bad_arguments(cache):
    with pytest.raises(TypeError, match="features must be a datasets.Dataset feature cache, got dict"):
        hf_align.select_layers({"vision_layer_0": torch.randn(4, 2)})
    with pytest.raises(ValueError, match=r"metric must be one of \('mutual_knn', 'cka', 'unbiased_cka'\), got 'rsa'"):
        hf_align.select_layers(cache, metric="rsa")
    with pytest.raises(ValueError, match="n_samples must be an int >= 2, got 1"):
        hf_align.select_layers(cache, n_samples=1)
    with pytest.raises(ValueError, match="normalize must be True or False, got 'yes'"):
        hf_align.select_layers(cache, normalize="yes")
    with pytest.raises(ValueError, match="normalize must be True or False, got 1"):
        hf_align.functional.cka(torch.randn(5, 2), torch.randn(5, 3), normalize=1)
