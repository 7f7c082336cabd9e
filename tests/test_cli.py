"""The CLI: recipes parse into the commands' dataclasses, bad recipes are named, and the quickstart runs end to end."""

import json

import pytest

from hf_align import AlignerModel
from hf_align.commands import COMMANDS
from hf_align.commands.arguments import DataArguments, ModelArguments, parse_layer
from hf_align.commands.cli import main, parse_command_args
from hf_align.evaluation import evaluate_zero_shot
from hf_align.experiments.quickstart import CAPTION_TEMPLATES, QuickstartArguments, run_quickstart
from hf_align.testing import DIGIT_NAMES, digits_dataset, save_tiny_vision_encoder
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


def test_quickstart_beats_chance_and_its_saved_aligner_reproduces_its_figure(tmp_path, capsys):
    # The quickstart's pipeline on an untrained 4-layer ViT, which keeps this fast (its own vision tower, the real
    # EfficientNet-Lite0, runs at 224 px); the ViT's patch tokens averaged, as its authors' CLS token is untrained.
    # Without STRUCTURE (structure_weight=0): it would keep the untrained tower's neighbourhoods, which are noise, and
    # with a regulariser the best weights follow eval_loss, which on 24 validation rows of noise features picked early
    # weights (measured 23.3% top-1 with STRUCTURE against 58.3% without).
    vit = save_tiny_vision_encoder(str(tmp_path / "untrained-vit"), "vit", image_size=32, hidden_size=64, num_layers=4)
    result = run_quickstart(
        QuickstartArguments(
            output_dir=str(tmp_path / "run"),
            vision_model=vit,
            vision_pooling="mean",
            max_samples=300,
            structure_weight=0.0,
        )
    )
    out = capsys.readouterr().out
    assert (
        "reading last_hidden_state · mean (64-d) and sentence_embedding (384-d)" in out
        and "chance 10.0%" in out
        and "pipeline('zero-shot-image-classification')" in out
    )
    metrics = result["zero_shot"]
    # No recipe: the library's defaults. 216 pairs train (train() keeps 10% of the 240 for validation): batch 32
    # (216 / 4 = 54 -> 32), 7 steps an epoch, at most 100 epochs, early stopping on the validation recall
    assert result["chance"] == 10.0 and 0 < result["train_steps"] <= 700
    assert "trained " in out and " of 700 steps" in out
    # 60 held-out images (20% of 300): top-1 is a whole number of them
    correct = metrics["top1"] * 60 / 100
    assert correct == pytest.approx(round(correct), abs=1e-4)
    # Even the untrained ViT's features (random projections of the pixels) separate digits once aligned: measured
    # 58.3% (35 of 60) with the defaults and no STRUCTURE (28.3% with the old recipe of 100 epochs at batch 128). At
    # least 24 of 60 right has probability below 1e-6 for a chance-level (10%) classifier.
    assert metrics["top1"] >= 40.0 and metrics["top5"] >= metrics["top1"]
    # The figure is on the saved card, and the saved folder alone (encoders re-loaded from the paths its config
    # records) gives the same figures on the same held-out images: 20% of its 300 digits, by row position and seed.
    card = (tmp_path / "run" / "aligner" / "README.md").read_text()
    assert "### Zero-shot image classification: scikit-learn digits (held-out 20% of train)" in card
    reloaded = AlignerModel.from_pretrained(result["aligner_dir"])
    held_out = digits_dataset(300, seed=0).train_test_split(test_size=0.2, seed=0)["test"]
    again = evaluate_zero_shot(reloaded, reloaded.processor, held_out, DIGIT_NAMES, templates=CAPTION_TEMPLATES)
    assert again == pytest.approx(metrics, rel=0, abs=1e-9)


def test_extract_train_evaluate_commands_on_a_local_dataset(tiny_vit, tiny_bert, tmp_path, capsys):
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
