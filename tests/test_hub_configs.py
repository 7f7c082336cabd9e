"""Every hub_configs/*.yaml recipe parses with `hf-align train`'s argument classes and its method settings build; the
recipes that reproduce a paper state the table entry they target and carry the authors' settings."""

import glob
import json
import os

import pytest

import hf_align
from hf_align.commands import COMMANDS
from hf_align.commands.arguments import parse_layer
from hf_align.commands.cli import parse_command_args

HERE = os.path.dirname(__file__)
RECIPES = sorted(glob.glob(os.path.join(HERE, os.pardir, "hub_configs", "*.yaml")))
# The recipes reproducing a paper's setup (DINOv2-L/14 + all-roberta-large-v1 on COCO 2014 train), by method.
PAPER_RECIPES = {
    "linear": "dinov2-large_roberta-large_coco_linear_structure.yaml",
    "mlp": "dinov2-large_roberta-large_coco_mlp_structure.yaml",
    "token_relative": "dinov2-large_roberta-large_coco_token_relative.yaml",
    "codebook": "dinov2-large_roberta-large_coco_codebook.yaml",
    "asif": "dinov2-large_roberta-large_coco_asif.yaml",
}


def parse(recipe, tmp_path):
    return parse_command_args(COMMANDS["train"].argument_classes, [recipe, "--output_dir", str(tmp_path)])


def build(model_args):
    method_kwargs = json.loads(model_args.method_kwargs)  # recipe mappings arrive as the JSON a flag would carry
    return hf_align.AlignerModel.from_feature_dims(
        8,
        8,
        method=model_args.method,
        vision_pooling=model_args.vision_pooling,
        text_pooling=model_args.text_pooling,
        **method_kwargs,
    )


def recipe_path(name: str) -> str:
    return os.path.join(HERE, os.pardir, "hub_configs", name)


def test_recipes_are_shipped():
    assert {os.path.basename(r) for r in RECIPES} >= {
        "dinov2-small_minilm-l6_coco_linear_structure.yaml",
        "dinov2-base_mpnet-base_coco_linear_structure.yaml",
        "dinov2-small_minilm-l6_coco_token_relative.yaml",
        *PAPER_RECIPES.values(),
    }


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_recipe_parses_and_its_aligner_builds(recipe, tmp_path):
    model_args, data_args, training_args = parse(recipe, tmp_path)
    assert training_args.output_dir == str(tmp_path)  # flags after the recipe override it
    assert model_args.vision_model.startswith("facebook/dinov2-")
    assert model_args.text_model.startswith("sentence-transformers/")
    for name in ("vision_layer", "text_layer"):
        parse_layer(name, getattr(model_args, name))
    assert data_args.image_column == "image" and data_args.text_column in ("answer", "captions")
    assert training_args.metric_for_best_model == "auto" or training_args.metric_for_best_model.startswith("eval_")
    # the method and regulariser settings are valid: the aligner builds (on small feature widths, no download)
    model = build(model_args)
    assert model.config.method == model_args.method
    if "structure" in os.path.basename(recipe):
        structure = model.regularizers["structure"].config
        assert (structure.weight, structure.warmup_steps, structure.divergence) == (10.0, 1000, "authors_rkl")


@pytest.mark.parametrize("method", sorted(PAPER_RECIPES))
def test_paper_recipes_name_their_target_and_use_the_authors_schedule(method, tmp_path):
    recipe = recipe_path(PAPER_RECIPES[method])
    with open(recipe, encoding="utf-8") as handle:
        assert "\n# Target: " in handle.read()
    model_args, data_args, args = parse(recipe, tmp_path)
    assert (model_args.vision_model, model_args.text_model) == (
        "facebook/dinov2-large",
        "sentence-transformers/all-roberta-large-v1",
    )
    assert model_args.method == method
    assert (data_args.dataset, data_args.text_column, args.caption_sampling) == ("coco2014_train", "captions", "first")
    model = build(model_args)
    if method == "asif":  # training-free: every training pair is an anchor, PAL's k and p
        assert (args.eval_fraction, args.init_samples) == (0.0, 82783)
        assert model.aligner.config.num_anchors == 82783 and model.aligner.config.resolved_topk == 800
        return
    assert model.config.contrastive_temperature == 0.05
    assert (args.per_device_train_batch_size, args.learning_rate, args.adam_beta1, args.adam_beta2) == (
        4096,
        1e-3,
        0.9,
        0.95,
    )
    assert (args.weight_decay, args.max_grad_norm, args.warmup_steps, args.warmup_ratio) == (1e-4, 1.0, 0, 0.0)
    assert (args.num_train_epochs, args.early_stopping_patience) == (1000, 200)
    scheduler = args.lr_scheduler_kwargs
    scheduler = json.loads(scheduler) if isinstance(scheduler, str) else scheduler
    # a 2000-step cosine period (the authors' T_max = 1000) over 1000 epochs of ⌈0.95 · 82,783 / 4096⌉ = 20 steps
    assert args.lr_scheduler_type == "cosine" and scheduler == {"num_cycles": 1000 * 20 / 2000}
    if method in ("linear", "mlp"):
        assert model_args.vision_layer == model_args.text_layer == "auto"
        structure = model.regularizers["structure"].config
        assert (structure.levels, structure.tau, structure.margin) == (1, 0.05, 0.0)
        assert args.metric_for_best_model == "eval_loss"
    if method == "linear":
        assert model.aligner.config.projection_dim == 512 and model.aligner.config.bias is True
    if method == "token_relative":
        assert (model.aligner.config.num_anchors, model.aligner.config.pool_temperature) == (512, 0.03)
        assert model.config.regularizers == {}  # PAL trains without a STRUCTURE term


def test_unknown_recipe_key_is_named(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("vision_model: a\ntext_model: b\ndataset: c\nlearning_rte: 0.1\n")
    with pytest.raises(ValueError, match=r"recipe has unknown keys \['learning_rte'\]"):
        parse_command_args(COMMANDS["train"].argument_classes, [str(recipe)])
