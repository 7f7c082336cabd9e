"""Argument dataclasses shared by the CLI commands (parsed by `HfArgumentParser`, or read from a YAML recipe)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import datasets

from ..encoders.taps import POOLED_SOURCES
from ..features import extract_features
from ..features.decode import load_dataset_split


def parse_layer(name: str, value: str | int) -> int | str:
    """CLI layers arrive as strings: "-1" -> -1, "auto" stays "auto"."""
    if isinstance(value, int) or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an int hidden-state index or 'auto', got {value!r}") from None


def parse_layer_list(name: str, value: str | None):
    """None, "all" or a comma-separated list of ints and pooled-embedding names ("0,4,-1", "13,pooler_output": layer
    selection's candidates)."""
    if value is None or value == "all":
        return value
    try:
        return [v.strip() if v.strip() in POOLED_SOURCES else int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise ValueError(
            f"{name} must be 'all' or comma-separated ints and pooled embeddings {POOLED_SOURCES}, got {value!r}"
        ) from None


@dataclass
class ModelArguments:
    vision_model: str = field(metadata={"help": "Vision encoder: Hub id or local path of any vision AutoModel."})
    text_model: str = field(metadata={"help": "Text encoder: Hub id or local path of any text AutoModel."})
    method: str = field(default="linear", metadata={"help": "Aligner method (registry name)."})
    vision_layer: str = field(default="-1", metadata={"help": "Hidden-state index to tap, or 'auto'."})
    text_layer: str = field(default="-1", metadata={"help": "Hidden-state index to tap, or 'auto'."})
    vision_pooling: str = field(default="auto", metadata={"help": "auto | cls | mean | max | tokens | none"})
    text_pooling: str = field(
        default="auto", metadata={"help": "auto | cls | mean | max | last | weightedmean | tokens | none"}
    )
    vision_source: str = field(
        default="auto",
        metadata={"help": "auto | hidden_states | last_hidden_state | pooler_output | projected (what is read)"},
    )
    text_source: str = field(
        default="auto",
        metadata={"help": "auto | hidden_states | last_hidden_state | pooler_output | projected | sentence_embedding"},
    )
    method_kwargs: str = field(
        default="{}", metadata={"help": 'JSON object of method / regulariser settings, e.g. {"projection_dim": 512}.'}
    )
    dtype: str | None = field(default=None, metadata={"help": "Encoder dtype, e.g. bfloat16 (default: float32)."})

    def build(self):
        from ..model.modeling import AlignerModel

        kwargs = json.loads(self.method_kwargs) if isinstance(self.method_kwargs, str) else dict(self.method_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError(f"method_kwargs must be a JSON object, got {self.method_kwargs!r}")
        return AlignerModel.from_encoders(
            self.vision_model,
            self.text_model,
            method=self.method,
            vision_layer=parse_layer("vision_layer", self.vision_layer),
            text_layer=parse_layer("text_layer", self.text_layer),
            vision_pooling=self.vision_pooling,
            text_pooling=self.text_pooling,
            vision_source=self.vision_source,
            text_source=self.text_source,
            dtype=self.dtype,
            **kwargs,
        )


@dataclass
class DataArguments:
    dataset: str = field(metadata={"help": "Hub dataset id, a local dataset script/folder, or a save_to_disk folder."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    split: str = field(default="train", metadata={"help": "Split to use."})
    image_column: str = "image"
    text_column: str = "caption"
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N rows (after shuffling)."})
    shuffle_seed: int = 0
    extraction_batch_size: int = 64
    vision_layers: str | None = field(default=None, metadata={"help": "Layers to cache: 'all' or '0,6,-1'."})
    text_layers: str | None = field(default=None, metadata={"help": "Layers to cache: 'all' or '0,6,-1'."})
    cache_dir: str | None = field(default=None, metadata={"help": "Feature cache folder (default ~/.cache/hf_align)."})
    feature_cache: str | None = field(
        default=None, metadata={"help": "Use (or write) the feature cache in exactly this folder instead of cache_dir."}
    )
    on_bad_sample: str = field(default="raise", metadata={"help": "raise | skip: what an undecodable sample does."})
    num_workers: int | None = field(default=None, metadata={"help": "Preprocessing workers (default: up to 4)."})

    def load(self) -> datasets.Dataset:
        return load_dataset_split(self.dataset, self.dataset_config, self.split, self.max_samples, self.shuffle_seed)

    def extract(self, model, data: datasets.Dataset) -> datasets.Dataset:
        """The feature cache of `data` for `model`, as these arguments ask (reused when it exists)."""
        return extract_features(
            model,
            model.processor,
            data,
            image_column=self.image_column,
            text_column=self.text_column,
            vision_layers=parse_layer_list("vision_layers", self.vision_layers),
            text_layers=parse_layer_list("text_layers", self.text_layers),
            batch_size=self.extraction_batch_size,
            cache_dir=self.cache_dir,
            cache_path=self.feature_cache,
            on_bad_sample=self.on_bad_sample,
            num_workers=self.num_workers,
        )
