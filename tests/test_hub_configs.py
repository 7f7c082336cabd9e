"""Every hub_configs/*.yaml recipe parses with `hf-align train`'s argument classes, and its method settings build."""

import glob
import json
import os

import pytest

import hf_align
from hf_align.arguments import parse_layer
from hf_align.cli import parse_command_args
from hf_align.commands import COMMANDS

RECIPES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), os.pardir, "hub_configs", "*.yaml")))


def test_recipes_are_shipped():
    assert {os.path.basename(r) for r in RECIPES} >= {
        "dinov2-small_minilm-l6_coco_linear_structure.yaml",
        "dinov2-base_mpnet-base_coco_linear_structure.yaml",
        "dinov2-small_minilm-l6_coco_token_relative.yaml",
    }


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_recipe_parses_and_its_aligner_builds(recipe, tmp_path):
    model_args, data_args, training_args = parse_command_args(
        COMMANDS["train"].argument_classes, [recipe, "--output_dir", str(tmp_path)]
    )
    assert training_args.output_dir == str(tmp_path)  # flags after the recipe override it
    assert model_args.vision_model.startswith("facebook/dinov2-")
    assert model_args.text_model.startswith("sentence-transformers/")
    for name in ("vision_layer", "text_layer"):
        parse_layer(name, getattr(model_args, name))
    assert (data_args.image_column, data_args.text_column) == ("image", "answer")
    assert training_args.metric_for_best_model == "eval_mean_R@1"
    # the method and regulariser settings are valid: the aligner builds (on small feature widths, no download)
    method_kwargs = json.loads(model_args.method_kwargs)  # recipe mappings arrive as the JSON a flag would carry
    model = hf_align.AlignerModel.from_feature_dims(
        8,
        8,
        method=model_args.method,
        vision_pooling=model_args.vision_pooling,
        text_pooling=model_args.text_pooling,
        **method_kwargs,
    )
    assert model.config.method == model_args.method
    if "structure_weight" in method_kwargs:
        assert model.config.regularizers["structure"]["weight"] == 10.0


def test_unknown_recipe_key_is_named(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("vision_model: a\ntext_model: b\ndataset: c\nlearning_rte: 0.1\n")
    with pytest.raises(ValueError, match=r"recipe has unknown keys \['learning_rte'\]"):
        parse_command_args(COMMANDS["train"].argument_classes, [str(recipe)])
