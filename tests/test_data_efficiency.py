"""Data-efficiency experiment: protocol (nested subsets, held-out images, layer selection on the training pairs),
outputs (JSON / Markdown / PNG), CLI on the synthetic task, bad input."""

import json

import numpy as np
import pytest
import torch

import hf_align
from hf_align.commands.cli import main
from hf_align.experiments import data_efficiency
from hf_align.experiments.data_efficiency import DataEfficiencyResult, Variant, default_variants, run_data_efficiency
from hf_align.features import features_from_tensors
from hf_align.testing import make_paired_task

FAST = hf_align.AlignmentArguments(
    max_steps=15, per_device_train_batch_size=256, learning_rate=1e-2, eval_fraction=0.0, mixed_precision="no"
)


@pytest.fixture(scope="module")
def cache():
    # the shared latent lives in the first layer pair; the last layers encode nuisance only
    return make_paired_task(n=600, n_vision_layers=2, n_text_layers=2, shared_layers=(0, 0), seed=0).to_features()


@pytest.fixture(scope="module")
def result(cache, tmp_path_factory):
    variants = default_variants(method_kwargs={"projection_dim": 32}, structure={"weight": 10.0, "warmup_steps": 5})
    out = tmp_path_factory.mktemp("efficiency")
    return run_data_efficiency(
        cache,
        sizes=(150, 5000),
        seeds=(0, 1),
        variants=variants,
        n_test=200,
        training_args=FAST,
        selection_kwargs={"n_samples": 300},
        output_dir=str(out),
    ), out


def test_default_variants_are_method_and_structure_on_last_and_selected_layers():
    names = [v.name for v in default_variants()]
    assert names == ["linear / last", "linear+STRUCTURE / last", "linear / selected", "linear+STRUCTURE / selected"]
    assert default_variants()[1].method_kwargs == {"structure_weight": 10.0}


def test_runs_cover_every_size_seed_and_variant(result):
    res, _ = result
    assert res.sizes == [150]  # 5000 exceeds the 400 pairs left after holding out 200 images: dropped
    assert len(res.runs) == 2 * 4
    assert res.settings["n_test_images"] == 200 and res.settings["pool_rows"] == 400
    for run in res.runs:
        assert set(run["metrics"]) >= {"mean_R@1", "image_to_text_R@10", "text_to_image_R@5"}
        expected = [1, 1] if run["layers_source"] == "last" else [0, 0]
        assert run["layers"] == expected  # selection on the n training pairs finds the planted pair


def test_selected_layers_beat_the_nuisance_last_layers(result):
    summary = result[0].summary()
    # 200 held-out images: chance R@1 is 0.5 %
    assert summary["linear / last"][150]["mean"] < 3.0
    assert summary["linear / selected"][150]["mean"] > 10.0


def test_summary_is_mean_and_sample_std_over_seeds(result):
    res, _ = result
    values = [r["metrics"]["mean_R@1"] for r in res.runs if r["variant"] == "linear / selected" and r["n"] == 150]
    cell = res.summary()["linear / selected"][150]
    mean = sum(values) / 2
    assert cell["mean"] == pytest.approx(mean)
    assert cell["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)  # ddof = 1 with two seeds


def test_files_written_and_reloadable(result):
    res, out = result
    payload = json.loads((out / "data_efficiency.json").read_text())
    assert payload["metric"] == "mean_R@1" and len(payload["runs"]) == 8
    assert DataEfficiencyResult.load(str(out / "data_efficiency.json")).summary() == res.summary()
    table = (out / "data_efficiency.md").read_text()
    assert (
        "| n images | linear / last | linear+STRUCTURE / last | linear / selected | linear+STRUCTURE / selected |"
        in table
    )
    cell = res.summary()["linear+STRUCTURE / selected"][150]
    assert f"{cell['mean']:.1f} ± {cell['std']:.1f}" in table
    assert (out / "data_efficiency.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_on_the_synthetic_task(tmp_path, capsys):
    code = main(
        [
            "data-efficiency",
            "--synthetic",
            "--synthetic_pairs",
            "500",
            "--output_dir",
            str(tmp_path),
            "--sizes",
            "150",
            "--seeds",
            "0",
            "--n_test",
            "100",
            "--max_steps",
            "5",
            "--per_device_train_batch_size",
            "128",
            "--method_kwargs",
            '{"projection_dim": 16}',
            "--structure",
            '{"weight": 1.0, "warmup_steps": 0}',
            "--mixed_precision",
            "no",
        ]
    )
    assert code == 0
    res = DataEfficiencyResult.load(str(tmp_path / "data_efficiency.json"))
    assert res.sizes == [150] and len(res.runs) == 4
    assert "linear+STRUCTURE / selected" in capsys.readouterr().out


def test_bad_input(cache):
    with pytest.raises(
        ValueError, match=r"n_test=600 gives 600 held-out images of the 600 in the cache; need at least 2"
    ):
        run_data_efficiency(cache, n_test=600)
    with pytest.raises(ValueError, match=r"n_test=1 gives 1 held-out images of the 600 in the cache; need at least 2"):
        run_data_efficiency(cache, n_test=1)
    with pytest.raises(ValueError, match=r"no training size fits: sizes \[5000\] all exceed the 500 images"):
        run_data_efficiency(cache, sizes=(5000,), n_test=100)
    with pytest.raises(ValueError, match=r"sizes must be ints >= 2 \(training images\), got 1"):
        run_data_efficiency(cache, sizes=(1,), n_test=100)
    with pytest.raises(TypeError, match="features must be a datasets.Dataset feature cache, got list"):
        run_data_efficiency([1, 2])
    with pytest.raises(ValueError, match=r"layers must be one of \('last', 'selected'\), got 'first'"):
        Variant("x", layers="first")
    with pytest.raises(ValueError, match="the feature cache holds no pooled text layers"):
        run_data_efficiency(cache.remove_columns(["text_layer_0", "text_layer_1"]), n_test=100)


def test_n_counts_images_with_all_their_captions(monkeypatch):
    # 60 images with 5 captions each (rows 5i .. 5i+4 belong to image 100 + i)
    task = make_paired_task(n=60, n_vision_layers=1, n_text_layers=1, seed=2)
    g = torch.Generator().manual_seed(0)
    text = task.text[0].repeat_interleave(5, 0) + 0.05 * torch.randn(300, task.text[0].shape[1], generator=g)
    cache = features_from_tensors(
        {0: task.vision[0].repeat_interleave(5, 0)}, {0: text}, image_id=torch.arange(100, 160).repeat_interleave(5)
    )
    subsets = []
    one_run = data_efficiency._one_run

    def recording(variant, subset, test, n, seed, *args):
        subsets.append((n, seed, np.asarray(subset["image_id"]), np.asarray(test["image_id"])))
        return one_run(variant, subset, test, n, seed, *args)

    monkeypatch.setattr(data_efficiency, "_one_run", recording)
    args = hf_align.AlignmentArguments(max_steps=2, per_device_train_batch_size=64, eval_fraction=0.0)
    variant = Variant("linear", method_kwargs={"projection_dim": 8})
    result = run_data_efficiency(cache, sizes=(10, 20), seeds=(0, 1), variants=[variant], n_test=20, training_args=args)
    assert result.settings["pool_images"] == 40 and result.settings["pool_rows"] == 200
    assert result.settings["caption_sampling"] == "auto"
    assert [(run["n"], run["n_rows"]) for run in result.runs] == [(10, 50), (20, 100)] * 2
    by_key = {(n, seed): ids for n, seed, ids, _ in subsets}
    for (n, seed), ids in by_key.items():
        images, counts = np.unique(ids, return_counts=True)
        assert len(images) == n and (counts == 5).all()  # n images, each with all 5 captions
        assert set(images).isdisjoint(subsets[0][3])  # none of the held-out images
        assert set(images) <= set(by_key[20, seed])  # nested: the 10 images are among the 20
    assert set(by_key[10, 0]) != set(by_key[10, 1])  # each seed draws its own images
    assert "| n images | linear |" in result.to_markdown()
    assert "n counts training images (each with all its captions, caption sampling 'auto')" in result.to_markdown()
