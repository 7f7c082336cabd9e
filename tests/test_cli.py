"""The CLI: recipes parse into the commands' dataclasses, bad recipes are named, and the quickstart runs end to end."""

import json

import pytest

from hf_align.arguments import DataArguments, ModelArguments, parse_layer
from hf_align.cli import main, parse_command_args
from hf_align.commands import COMMANDS
from hf_align.experiments.quickstart import QuickstartArguments, run_quickstart
from hf_align.training import AlignmentArguments


def test_every_command_is_registered():
    assert {"extract", "train", "evaluate", "quickstart"} <= set(COMMANDS)
    assert main(["--help"]) == 0


def test_recipe_then_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "vision_model: facebook/dinov2-small\ntext_model: sentence-transformers/all-MiniLM-L6-v2\n"
        "vision_layer: auto\nmethod_kwargs: {projection_dim: 256, structure_weight: 10.0}\n"
        "dataset: some/dataset\noutput_dir: out\nlearning_rate: 0.002\n"
    )
    model_args, data_args, train_args = parse_command_args(
        (ModelArguments, DataArguments, AlignmentArguments), [str(recipe), "--learning_rate", "0.01"]
    )
    assert model_args.vision_layer == "auto" and json.loads(model_args.method_kwargs) == {
        "projection_dim": 256,
        "structure_weight": 10.0,
    }
    assert data_args.dataset == "some/dataset" and train_args.output_dir == "out"
    assert train_args.learning_rate == 0.01  # the flag overrides the recipe


def test_recipe_with_unknown_keys_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("vision_model: a\ntext_model: b\ndataset: c\nlearning_rat: 1\n")
    with pytest.raises(ValueError, match=r"recipe has unknown keys \['learning_rat'\]"):
        parse_command_args((ModelArguments, DataArguments, AlignmentArguments), [str(recipe)])


def test_layer_strings():
    assert parse_layer("vision_layer", "-2") == -2 and parse_layer("vision_layer", "auto") == "auto"
    with pytest.raises(ValueError, match="vision_layer must be an int hidden-state index or 'auto', got 'top'"):
        parse_layer("vision_layer", "top")


def test_quickstart_runs_end_to_end_offline(tmp_path, capsys):
    result = run_quickstart(
        QuickstartArguments(output_dir=str(tmp_path), max_samples=300, num_train_epochs=10, batch_size=128)
    )
    out = capsys.readouterr().out
    assert (
        "RANDOM weights (untrained)" in out
        and "chance 10.0%" in out
        and "pipeline('zero-shot-image-classification')" in out
    )
    assert result["chance"] == 10.0 and 0.0 <= result["zero_shot"]["top1"] <= 100.0
    assert result["zero_shot"]["top5"] >= result["zero_shot"]["top1"]


def test_extract_train_evaluate_commands_on_a_local_dataset(tiny_vit, tiny_bert, tmp_path, capsys):
    from hf_align.testing import digits_dataset

    data_dir = str(tmp_path / "digits")
    digits_dataset(40).save_to_disk(data_dir)
    common = [
        "--vision_model",
        tiny_vit,
        "--text_model",
        tiny_bert,
        "--dataset",
        data_dir,
        "--cache_dir",
        str(tmp_path / "cache"),
    ]
    assert main(["extract", *common, "--vision_layers", "all"]) == 0
    assert "rows, columns ['vision_layer_0', 'vision_layer_1', 'vision_layer_2'" in capsys.readouterr().out
    out = str(tmp_path / "aligner")
    assert (
        main(
            [
                "train",
                *common,
                "--output_dir",
                out,
                "--max_steps",
                "3",
                "--per_device_train_batch_size",
                "16",
                "--eval_fraction",
                "0.2",
                "--method_kwargs",
                '{"projection_dim": 8}',
            ]
        )
        == 0
    )
    assert f"aligner saved to {out}" in capsys.readouterr().out
    report = tmp_path / "metrics.json"
    assert (
        main(
            [
                "evaluate",
                "--model",
                out,
                "--dataset",
                data_dir,
                "--split",
                "train",
                "--tasks",
                "zero_shot,retrieval",
                "--templates",
                "a handwritten digit {}",
                "--output_file",
                str(report),
            ]
        )
        == 0
    )
    metrics = json.loads(report.read_text())
    assert set(metrics) == {"zero_shot", "retrieval"} and "image_to_text_R@1" in metrics["retrieval"]
    card = (tmp_path / "aligner" / "README.md").read_text()
    assert "model-index" in card  # the CLI evaluation reached the saved card
