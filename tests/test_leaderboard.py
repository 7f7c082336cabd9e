"""Leaderboard: methods x similarity heads on one cache with one budget; Markdown/JSON output; the compare CLI."""

import json

import numpy as np
import pytest
import torch

from hf_align.experiments.compare import compare, split_features, synthetic_features
from hf_align.features import features_from_tensors
from hf_align.testing import make_paired_task
from hf_align.training import AlignmentArguments

BUDGET = dict(max_steps=20, per_device_train_batch_size=128, logging_steps=1000, eval_fraction=0.1)


@pytest.fixture(scope="module")
def small_cache():
    return synthetic_features(n=400, seed=0, tokens=False)


@pytest.fixture(scope="module")
def board(small_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("board")
    result = compare(
        small_cache,
        methods=["linear", "token_relative"],
        similarities=["cosine", "bilinear"],
        seeds=[0, 1],
        args=AlignmentArguments(**BUDGET),
        method_kwargs={"linear": {"projection_dim": 16}},
        output_dir=out,
        verbose=False,
    )
    return result, out


def test_every_combination_is_listed_with_a_status(board):
    result, _ = board
    assert {(e.method, e.similarity) for e in result.entries} == {
        (m, s) for m in ("linear", "token_relative") for s in ("cosine", "bilinear")
    }
    for similarity in ("cosine", "bilinear"):
        entry = result.get("linear", similarity)
        assert entry.status == "ok", entry.reason
        assert entry.seeds == [0, 1] and len(entry.per_seed) == 2
        for key in ("mean_R@1", "image_to_text_R@1", "text_to_image_R@10", "zero_shot_top1", "modality_gap"):
            assert key in entry.metrics and key in entry.metrics_std
        assert entry.metrics["mean_R@1"] == pytest.approx(np.mean([r["mean_R@1"] for r in entry.per_seed]))
        assert entry.train_time_s > 0
    # a learned head adds its D x D parameters to the same projection
    linear_params = result.get("linear", "cosine").trainable_params
    assert result.get("linear", "bilinear").trainable_params == linear_params + 16 * 16
    # configuration-time rejections are n/a with the reason, not failures: this cache has no token columns
    for similarity in ("cosine", "bilinear"):
        no_tokens = result.get("token_relative", similarity)
        assert no_tokens.status == "n/a" and no_tokens.per_seed == []
        assert no_tokens.reason == "method 'token_relative' needs token vision features; the cache has none"


def test_training_learns_something_and_zero_shot_uses_class_prototypes(board):
    result, _ = board
    entry = result.get("linear", "cosine")
    # 10 well-separated clusters: chance is 10% zero-shot; 80 test images: chance R@10 ~ 12.5%
    assert entry.metrics["zero_shot_top1"] > 50
    assert entry.metrics["mean_R@10"] > 25


def test_markdown_and_json_are_written_and_ranked(board):
    result, out = board
    markdown = (out / "leaderboard.md").read_text()
    assert "| # | method | similarity |" in markdown and "ZS top-1" in markdown and "R@1 (mean)" in markdown
    assert "±" in markdown  # two seeds: mean ± std
    assert "n/a:" in markdown
    data = json.loads((out / "leaderboard.json").read_text())
    assert data["primary_metric"] == "mean_R@1"
    assert data["settings"]["seeds"] == [0, 1]
    assert data["settings"]["training_args"]["max_steps"] == BUDGET["max_steps"]
    ok = [e for e in data["entries"] if e["status"] == "ok"]
    scores = [e["metrics"]["mean_R@1"] for e in ok]
    assert scores == sorted(scores, reverse=True)
    assert data["entries"][: len(ok)] == ok  # n/a rows come last
    # the files hold exactly this board: 400 images, test_fraction 0.2 -> 80 held out
    assert markdown == result.to_markdown() and data == json.loads(result.to_json())
    assert data["settings"]["n_test_rows"] == 80 and data["settings"]["n_train_rows"] == 320
    assert "(80 rows); trained on 320 rows, seeds [0, 1]" in markdown


def test_zero_shot_is_skipped_without_a_label_column():
    task = make_paired_task(n=200, seed=1)
    cache = features_from_tensors(task.vision, task.text)
    result = compare(
        cache,
        methods=["linear"],
        similarities=["cosine"],
        args=AlignmentArguments(**BUDGET),
        verbose=False,
        method_kwargs={"linear": {"projection_dim": 8}},
    )
    entry = result.get("linear", "cosine")
    assert entry.status == "ok"
    assert not any(k.startswith("zero_shot") for k in entry.metrics)
    assert any("zero-shot skipped" in note for note in result.notes)
    assert "ZS top-1" not in result.to_markdown()


def test_a_failing_run_is_recorded_and_the_others_go_on(small_cache, monkeypatch):
    import hf_align.training.loop

    real_train = hf_align.training.loop.train

    def flaky_train(model, features, args):
        if model.config.similarity == "euclidean":
            raise FloatingPointError("non-finite training loss nan at step 3")
        return real_train(model, features, args)

    monkeypatch.setattr(hf_align.training.loop, "train", flaky_train)
    result = compare(
        small_cache,
        methods=["linear"],
        similarities=["euclidean", "cosine"],
        verbose=False,
        args=AlignmentArguments(**{**BUDGET, "max_steps": 2}),
        method_kwargs={"linear": {"projection_dim": 8}},
    )
    failed, ok = result.get("linear", "euclidean"), result.get("linear", "cosine")
    assert failed.status == "failed" and failed.reason == "FloatingPointError: non-finite training loss nan at step 3"
    assert ok.status == "ok" and "mean_R@1" in ok.metrics
    assert "failed: FloatingPointError" in result.to_markdown()


def test_unknown_names_are_rejected_up_front(small_cache):
    with pytest.raises(ValueError, match="unknown method"):
        compare(small_cache, methods=["linear", "nope"], verbose=False)
    with pytest.raises(ValueError, match="cosinus"):
        compare(small_cache, similarities=["cosinus"], verbose=False)


def test_split_keeps_the_captions_of_an_image_together():
    task = make_paired_task(n=120, seed=2)
    image_id = torch.arange(120) // 3  # three captions per image
    cache = features_from_tensors(task.vision, task.text, image_id=image_id)
    train, test = split_features(cache, test_fraction=0.25, seed=0)
    train_ids, test_ids = set(train["image_id"]), set(test["image_id"])
    assert not train_ids & test_ids
    assert len(test_ids) == 10 and len(train) + len(test) == 120
    assert split_features(cache, 0.25, 0)[1]["image_id"] == test["image_id"]  # deterministic
    with pytest.raises(ValueError, match="test_fraction"):
        split_features(cache, 1.5)


def test_compare_cli_on_the_synthetic_task(tmp_path, capsys):
    from hf_align.commands.cli import main

    code = main(
        [
            "compare",
            "--features",
            "synthetic",
            "--synthetic_size",
            "300",
            "--methods",
            "linear",
            "--similarities",
            "cosine,dot",
            "--seeds",
            "0",
            "--max_steps",
            "3",
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| # | method | similarity |" in printed
    data = json.loads((tmp_path / "leaderboard.json").read_text())
    assert {e["similarity"] for e in data["entries"]} == {"cosine", "dot"}
    # the synthetic preset filled the settings left at their defaults, not the ones given
    assert data["settings"]["training_args"]["max_steps"] == 3
    assert data["settings"]["training_args"]["per_device_train_batch_size"] == 256
    assert data["settings"]["method_kwargs"]["linear"] == {"projection_dim": 64}
