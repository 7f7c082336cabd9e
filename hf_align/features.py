"""The feature cache: frozen encoder outputs extracted once, stored as an Arrow-backed `datasets.Dataset` on disk.

Layout of a cache (one row per image–caption pair; an image with several captions gives several rows):

* `vision_layer_{l}` / `text_layer_{l}`: pooled features of hidden state `l` (absolute index), float32 (d,).
* `vision_tokens_layer_{l}`: patch tokens (T, d) float16; `text_tokens_layer_{l}`: the caption's non-padding tokens
  (T_i, d) float16, variable length. Stored only for token poolings.
* `image_id`: int64 id of the source image (the row of the source dataset); captions of one image share it.
* any `keep_columns` of the source dataset (e.g. `label`), repeated per caption.

A cache lives in `<cache_dir>/<fingerprint>/` and is written under a temporary name, then renamed, so a crash never
leaves a half-written cache behind. The fingerprint covers the encoders (id, revision or local weights), layers,
poolings, the image processor and tokenizer settings, the columns and the source dataset's own fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import torch
from datasets.arrow_writer import ArrowWriter
from transformers.utils import logging

from .encoders import pool_text, pool_vision

logger = logging.get_logger(__name__)

CACHE_FORMAT_VERSION = 1
META_FILE = "hf_align_cache.json"
DATA_FILE = "features.arrow"


def layer_column(modality: str, layer: int, tokens: bool = False) -> str:
    """Cache column of `modality` ("vision"/"text") at absolute hidden-state index `layer`."""
    return f"{modality}_tokens_layer_{layer}" if tokens else f"{modality}_layer_{layer}"


def cached_layers(features: datasets.Dataset, modality: str, tokens: bool = False) -> list[int]:
    """Absolute layer indices a cache holds for `modality` (pooled, or token columns with `tokens=True`)."""
    prefix = f"{modality}_tokens_layer_" if tokens else f"{modality}_layer_"
    return sorted(int(c[len(prefix) :]) for c in features.column_names if c.startswith(prefix))


def default_cache_dir() -> str:
    return os.environ.get("HF_ALIGN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hf_align", "features"))


# ---------------------------------------------------------------------------------------------- schema
def _features_schema(
    vision_dims: dict[int, int],
    text_dims: dict[int, int],
    vision_token_dims: dict[int, tuple[int, int]],
    text_token_dims: dict[int, int],
    extra: datasets.Features | None = None,
) -> datasets.Features:
    schema = {}
    for layer, dim in vision_dims.items():
        schema[layer_column("vision", layer)] = datasets.List(datasets.Value("float32"), length=dim)
    for layer, dim in text_dims.items():
        schema[layer_column("text", layer)] = datasets.List(datasets.Value("float32"), length=dim)
    for layer, (length, dim) in vision_token_dims.items():
        schema[layer_column("vision", layer, tokens=True)] = datasets.Array2D(shape=(length, dim), dtype="float16")
    for layer, dim in text_token_dims.items():
        schema[layer_column("text", layer, tokens=True)] = datasets.Array2D(shape=(None, dim), dtype="float16")
    schema["image_id"] = datasets.Value("int64")
    schema.update(extra or {})
    return datasets.Features(schema)


def features_from_tensors(
    vision: dict[int, torch.Tensor],
    text: dict[int, torch.Tensor],
    vision_tokens: dict[int, torch.Tensor] | None = None,
    text_tokens: dict[int, torch.Tensor] | None = None,
    text_mask: torch.Tensor | None = None,
    image_id: torch.Tensor | Sequence[int] | None = None,
    extra_columns: dict[str, Sequence[Any]] | None = None,
) -> datasets.Dataset:
    """Build a feature cache (in memory) from tensors, e.g. a synthetic task or features computed elsewhere.

    Args:
        vision / text: layer -> (n, d) pooled features.
        vision_tokens: layer -> (n, T, d); text_tokens: layer -> (n, T, d) padded, with `text_mask` (n, T).
        image_id: (n,) source-image id per row (default: every row its own image).
        extra_columns: more columns (e.g. `{"label": labels}`), one value per row.
    """
    n = _common_length({**_named("vision", vision), **_named("text", text)})
    vision_tokens, text_tokens = vision_tokens or {}, text_tokens or {}
    if text_tokens and text_mask is None:
        raise ValueError("text_tokens given without text_mask: pass the (n, T) mask of real tokens")
    columns: dict[str, Any] = {}
    for layer, x in vision.items():
        columns[layer_column("vision", layer)] = x.float().numpy()
    for layer, x in text.items():
        columns[layer_column("text", layer)] = x.float().numpy()
    for layer, x in vision_tokens.items():
        columns[layer_column("vision", layer, tokens=True)] = x.half().numpy()
    for layer, x in text_tokens.items():
        columns[layer_column("text", layer, tokens=True)] = [row[m].half().numpy() for row, m in zip(x, text_mask.bool())]
    ids = torch.arange(n) if image_id is None else torch.as_tensor(image_id)
    if ids.shape != (n,):
        raise ValueError(f"image_id must have shape ({n},), got {tuple(ids.shape)}")
    columns["image_id"] = ids.long().numpy()
    for name, values in (extra_columns or {}).items():
        if len(values) != n:
            raise ValueError(f"extra column {name!r} has {len(values)} values, expected {n}")
        columns[name] = values.tolist() if isinstance(values, (torch.Tensor, np.ndarray)) else list(values)
    schema = _features_schema(
        {k: v.shape[-1] for k, v in vision.items()},
        {k: v.shape[-1] for k, v in text.items()},
        {k: tuple(v.shape[1:]) for k, v in vision_tokens.items()},
        {k: v.shape[-1] for k, v in text_tokens.items()},
    )
    for name in extra_columns or {}:
        schema[name] = datasets.Dataset.from_dict({name: columns[name][:1]}).features[name]
    return datasets.Dataset.from_dict(columns, features=schema)


def _named(prefix: str, tensors: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix} layer {k}": v for k, v in tensors.items()}


def _common_length(tensors: dict[str, torch.Tensor]) -> int:
    if not tensors:
        raise ValueError("no features given: need at least one vision and one text layer")
    lengths = {name: t.shape[0] for name, t in tensors.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"mismatched sample counts between feature sets: {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError("features hold 0 samples")
    return n


# ---------------------------------------------------------------------------------------------- the model's view
def features_for(model, features: datasets.Dataset) -> datasets.Dataset:
    """The columns `model` trains on, renamed to its `forward` arguments: `vision_features`, `text_features`.

    Picks the layers `model.config` taps (pooled columns, or token columns for token poolings) and keeps `image_id`.
    The result is what `transformers.Trainer` takes as `train_dataset` with `FeatureCollator`.
    """
    config = model.config
    columns = {}
    for modality in ("vision", "text"):
        tokens = getattr(config, f"resolved_{modality}_pooling") == "tokens"
        layer = _cache_layer(config, features, modality, tokens)
        name = layer_column(modality, layer, tokens)
        if name not in features.column_names:
            have = cached_layers(features, modality, tokens)
            kind = "token" if tokens else "pooled"
            raise ValueError(
                f"the feature cache has no {kind} {modality} features for {modality}_layer="
                f"{getattr(config, f'{modality}_layer')} (column {name!r}); {kind} {modality} layers cached: {have}. "
                "Re-extract with that layer (extract_features(..., "
                f"{modality}_layers=[{layer}]))"
            )
        columns[name] = f"{modality}_features"
    keep = list(columns) + (["image_id"] if "image_id" in features.column_names else [])
    return features.select_columns(keep).rename_columns(columns)


def _cache_layer(config, features: datasets.Dataset, modality: str, tokens: bool) -> int:
    layer = getattr(config, f"{modality}_layer")
    if getattr(config, f"{modality}_num_layers") is not None or (isinstance(layer, int) and layer >= 0):
        return config.absolute_layer(modality)
    # An aligner built from feature dims has no encoder to count layers: count them in the cache.
    have = cached_layers(features, modality, tokens)
    if not have:
        raise ValueError(f"the feature cache holds no {modality} layers (columns: {features.column_names})")
    if layer == "auto":
        raise ValueError(f"{modality}_layer is 'auto': run layer selection first (hf_align.select_layers)")
    from .configuration import resolve_layer_index

    return resolve_layer_index(f"{modality}_layer", layer, max(have) + 1)


class FeatureCollator:
    """Batch rows of a `features_for` view for `AlignerModel.forward`.

    Pooled features stack to (B, d). Token features are padded to the longest sequence in the batch, giving
    (B, T, d) plus a boolean mask (B, T) (`vision_mask` / `text_mask`). Adds `return_loss=True` so
    `transformers.Trainer` gets a loss from the model with no subclassing. Accepts a list of row dicts (what
    Trainer's DataLoader gives) or a dict of columns (what `dataset[indices]` gives).
    """

    def __call__(self, rows: list[dict[str, Any]] | dict[str, Any]) -> dict[str, Any]:
        columns = rows if isinstance(rows, dict) else {k: [row[k] for row in rows] for k in rows[0]}
        for required in ("vision_features", "text_features"):
            if required not in columns:
                raise ValueError(
                    f"FeatureCollator needs a `{required}` column, got {sorted(columns)}; pass "
                    "hf_align.features_for(model, features) rather than the raw cache"
                )
        batch: dict[str, Any] = {"return_loss": True}
        for modality in ("vision", "text"):
            values, mask = stack_features(columns[f"{modality}_features"])
            batch[f"{modality}_features"] = values
            if mask is not None:
                batch[f"{modality}_mask"] = mask
        return batch


def stack_features(values) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of pooled (d,) or token (T_i, d) features -> (B, d), or (B, T_max, d) float + (B, T_max) bool mask."""
    if isinstance(values, torch.Tensor):
        return _tokens_with_mask(values) if values.dim() == 3 else (values.float(), None)
    tensors = [torch.as_tensor(np.asarray(v)) for v in values]
    if tensors[0].dim() == 1:
        return torch.stack(tensors).float(), None
    longest = max(t.shape[0] for t in tensors)
    out = torch.zeros(len(tensors), longest, tensors[0].shape[-1])
    mask = torch.zeros(len(tensors), longest, dtype=torch.bool)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t.float()
        mask[i, : t.shape[0]] = True
    return out, mask


def _tokens_with_mask(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return values.float(), torch.ones(values.shape[:2], dtype=torch.bool)


# ---------------------------------------------------------------------------------------------- extraction
def extract_features(
    model,
    processor,
    dataset: datasets.Dataset,
    image_column: str = "image",
    text_column: str = "caption",
    vision_layers: Sequence[int] | str | None = None,
    text_layers: Sequence[int] | str | None = None,
    keep_columns: Sequence[str] = (),
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    max_text_length: int | None = None,
) -> datasets.Dataset:
    """Run the frozen encoders once over `dataset` and return the features as a cached, memory-mapped Dataset.

    Args:
        model: an `AlignerModel` with encoders attached (its config says which layers and poolings to store).
        processor: its `AlignerProcessor`.
        dataset: a `datasets.Dataset` with an image column (PIL images / anything the image processor takes) and a
            text column (a string, or a list of strings for several captions per image).
        vision_layers / text_layers: `None` = the layer the model taps (every layer when it is `"auto"`), `"all"`,
            or a list of hidden-state indices (negative allowed). Several layers are stored from one forward pass.
        keep_columns: source columns to copy into the cache (e.g. `["label"]`).
        batch_size: images per encoder forward pass (captions are batched the same way).
        cache_dir: where caches live (default `$HF_ALIGN_CACHE` or `~/.cache/hf_align/features`).
        max_text_length: tokenizer truncation length (default: the tokenizer's own maximum).

    Returns:
        The cache (see the module docstring for its columns). A second call with the same inputs loads it from disk
        and runs no encoder.
    """
    _check_extraction_inputs(model, processor, dataset, image_column, text_column, keep_columns, batch_size)
    config = model.config
    layers = {
        "vision": _requested_layers("vision", vision_layers, config),
        "text": _requested_layers("text", text_layers, config),
    }
    tokens = {m: getattr(config, f"resolved_{m}_pooling") == "tokens" for m in ("vision", "text")}
    token_layers = {m: ([config.absolute_layer(m)] if tokens[m] else []) for m in ("vision", "text")}
    pooled = {"vision": "cls" if config.vision_has_cls else "mean", "text": "mean"}
    for m in ("vision", "text"):
        if not tokens[m]:
            pooled[m] = getattr(config, f"resolved_{m}_pooling")
    parts = {
        "format": CACHE_FORMAT_VERSION,
        "vision_encoder": [config.vision_encoder, config.vision_revision, _local_signature(config.vision_encoder)],
        "text_encoder": [config.text_encoder, config.text_revision, _local_signature(config.text_encoder)],
        "layers": layers,
        "token_layers": token_layers,
        "pooling": pooled,
        "processor": _processor_signature(processor, max_text_length),
        "columns": [image_column, text_column, sorted(keep_columns)],
        "dataset": dataset._fingerprint,
    }
    fingerprint = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]
    root = os.fspath(cache_dir or default_cache_dir())
    target = os.path.join(root, fingerprint)
    cached = load_cache(target, parts)
    if cached is not None:
        logger.info(f"reusing feature cache {target}")
        return cached

    os.makedirs(root, exist_ok=True)
    tmp = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        n_rows = _write_features(
            model, processor, dataset, image_column, text_column, layers, token_layers, pooled, keep_columns,
            batch_size, max_text_length, os.path.join(tmp, DATA_FILE),
        )  # fmt: skip
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as handle:
            json.dump({"parts": parts, "num_rows": n_rows, "complete": True}, handle, default=str)
        if os.path.isdir(target):  # a concurrent writer finished first; theirs is identical
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_cache(target, parts)


def load_cache(path: str, parts: dict | None = None) -> datasets.Dataset | None:
    """Open a finished cache folder; `None` if there is none. `parts` (when given) must match what was recorded."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        return None
    with open(meta_path, encoding="utf-8") as handle:
        meta = json.load(handle)
    if parts is not None:
        recorded = meta.get("parts", {})
        expected = json.loads(json.dumps(parts, default=str))
        differing = sorted(k for k in expected if recorded.get(k) != expected[k])
        if differing:
            raise ValueError(f"feature cache {path!r} was built for other inputs: {differing} differ")
    dataset = datasets.Dataset.from_file(os.path.join(path, DATA_FILE))
    if len(dataset) != meta.get("num_rows"):
        raise ValueError(
            f"feature cache {path!r} is damaged: {len(dataset)} rows on disk, {meta.get('num_rows')} recorded"
        )
    return dataset


def _check_extraction_inputs(model, processor, dataset, image_column, text_column, keep_columns, batch_size):
    if not getattr(model, "has_encoders", False):
        raise ValueError("extract_features needs an AlignerModel with encoders attached (from_encoders/from_pretrained)")
    if processor is None:
        raise ValueError("extract_features needs the model's AlignerProcessor, got processor=None")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty: extract_features needs at least one image–caption pair")
    for argument, column in (("image_column", image_column), ("text_column", text_column)):
        if column not in dataset.column_names:
            raise ValueError(f"{argument}={column!r} is not a column of the dataset; columns: {dataset.column_names}")
    for column in keep_columns:
        if column not in dataset.column_names:
            raise ValueError(f"keep_columns names {column!r}, not a column of the dataset: {dataset.column_names}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _requested_layers(modality: str, requested, config) -> list[int]:
    from .configuration import resolve_layer_index

    num = getattr(config, f"{modality}_num_layers")
    if requested is None:
        requested = "all" if getattr(config, f"{modality}_layer") == "auto" else [getattr(config, f"{modality}_layer")]
    if requested == "all":
        return list(range(num))
    if isinstance(requested, (int, str)) or not all(isinstance(v, int) for v in requested):
        raise ValueError(f"{modality}_layers must be None, 'all' or a list of ints, got {requested!r}")
    return sorted({resolve_layer_index(f"{modality}_layers", v, num) for v in requested})


def _local_signature(path: str | None) -> list | None:
    """Size and mtime of a local encoder's weight files, so re-saving different weights there invalidates caches."""
    if not path or not os.path.isdir(path):
        return None
    files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
    return [[f, os.path.getsize(os.path.join(path, f)), os.path.getmtime(os.path.join(path, f))] for f in files]


def _processor_signature(processor, max_text_length) -> dict:
    image = processor.image_processor.to_dict()
    image.pop("processor_class", None)
    tokenizer = processor.tokenizer
    return {
        "image_processor": image,
        "tokenizer": [type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer), max_text_length],
    }


def estimate_cache_bytes(n_rows: int, vision_dims, text_dims, vision_token_shape, text_tokens_per_row) -> int:
    """Rough on-disk size: float32 pooled vectors + float16 token matrices per row."""
    size = 4 * (sum(vision_dims) + sum(text_dims))
    if vision_token_shape:
        size += 2 * vision_token_shape[0] * vision_token_shape[1]
    if text_tokens_per_row:
        size += 2 * text_tokens_per_row[0] * text_tokens_per_row[1]
    return n_rows * size


def _write_features(
    model, processor, dataset, image_column, text_column, layers, token_layers, pooled, keep_columns,
    batch_size, max_text_length, path,
) -> int:  # fmt: skip
    from transformers.utils.logging import tqdm

    config = model.config
    n_images = len(dataset)
    first_caption = dataset[0][text_column]
    captions_per_image = len(first_caption) if isinstance(first_caption, list) else 1
    vision_info_dims = _layer_widths(model, "vision", layers["vision"])
    text_info_dims = _layer_widths(model, "text", layers["text"])
    token_shape = None
    if token_layers["vision"]:
        token_shape = (_vision_token_count(model), vision_info_dims[token_layers["vision"][0]])
    text_token_estimate = None
    if token_layers["text"]:
        text_token_estimate = (32, text_info_dims[token_layers["text"][0]])
    estimate = estimate_cache_bytes(
        n_images * captions_per_image,
        list(vision_info_dims.values()),
        list(text_info_dims.values()),
        token_shape,
        text_token_estimate,
    )
    logger.info(f"extracting features of {n_images} images: estimated cache size {estimate / 2**20:.1f} MiB")
    schema = _features_schema(
        {layer: vision_info_dims[layer] for layer in layers["vision"]},
        {layer: text_info_dims[layer] for layer in layers["text"]},
        {layer: token_shape for layer in token_layers["vision"]},
        {layer: text_info_dims[layer] for layer in token_layers["text"]},
        datasets.Features({c: dataset.features[c] for c in keep_columns}),
    )
    writer = ArrowWriter(path=path, features=schema)
    n_rows = 0
    progress = tqdm(total=n_images, desc=f"hf_align: extracting features (~{estimate / 2**20:.0f} MiB)", unit="img")
    try:
        for start in range(0, n_images, batch_size):
            batch = dataset[start : start + batch_size]
            columns = _encode_batch(
                model, processor, batch, start, image_column, text_column, layers, token_layers, pooled,
                keep_columns, max_text_length,
            )  # fmt: skip
            writer.write_batch(columns)
            n_rows += len(columns["image_id"])
            progress.update(len(batch[image_column]))
        writer.finalize()
    finally:
        writer.close()
        progress.close()
    return n_rows


def _layer_widths(model, modality: str, layers: list[int]) -> dict[int, int]:
    from .encoders import probe_text, probe_vision

    encoder = getattr(model, f"{modality}_model")
    info = probe_vision(encoder, "") if modality == "vision" else probe_text(encoder, "")
    return {layer: info.hidden_sizes[layer] for layer in layers}


def _vision_token_count(model) -> int:
    from .encoders import as_token_sequence, image_size_of

    size = image_size_of(model.vision_model.config)
    param = next(model.vision_model.parameters())
    pixel_values = torch.zeros(1, getattr(model.vision_model.config, "num_channels", 3), size, size, dtype=param.dtype)
    state = model.vision_hidden_states(pixel_values)[model.config.absolute_layer("vision")]
    return as_token_sequence(state).shape[1]


@torch.no_grad()
def _encode_batch(
    model, processor, batch, start, image_column, text_column, layers, token_layers, pooled, keep_columns,
    max_text_length,
) -> dict[str, list]:  # fmt: skip
    images = batch[image_column]
    captions, owner = [], []
    for i, caption in enumerate(batch[text_column]):
        group = caption if isinstance(caption, list) else [caption]
        if not group:
            raise ValueError(f"row {start + i}: {text_column!r} holds an empty list of captions")
        for text in group:
            if not isinstance(text, str):
                raise TypeError(f"row {start + i}: {text_column!r} must hold strings, got {type(text).__name__}")
            captions.append(text)
            owner.append(i)
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    text_inputs = processor.tokenizer(
        captions, padding=True, truncation=True, max_length=max_text_length, return_tensors="pt"
    )
    autocast = _autocast(model)
    with autocast:
        vision_states = model.vision_hidden_states(pixel_values)
        text_states = model.text_hidden_states(
            text_inputs["input_ids"], text_inputs["attention_mask"], text_inputs.get("token_type_ids")
        )
    owner_index = torch.tensor(owner)
    attention_mask = text_inputs["attention_mask"].to(text_states[0].device)
    columns: dict[str, list] = {}
    has_cls = model.config.vision_has_cls
    for layer in layers["vision"]:
        values, _ = pool_vision(vision_states[layer].float(), pooled["vision"], has_cls)
        columns[layer_column("vision", layer)] = values.cpu()[owner_index].numpy()
    for layer in layers["text"]:
        values, _ = pool_text(text_states[layer].float(), attention_mask, pooled["text"])
        columns[layer_column("text", layer)] = values.cpu().numpy()
    for layer in token_layers["vision"]:
        values, _ = pool_vision(vision_states[layer], "tokens", has_cls)
        columns[layer_column("vision", layer, tokens=True)] = values.half().cpu()[owner_index].numpy()
    for layer in token_layers["text"]:
        state = text_states[layer].half().cpu()
        mask = attention_mask.bool().cpu()
        columns[layer_column("text", layer, tokens=True)] = [row[m].numpy() for row, m in zip(state, mask)]
    columns["image_id"] = (owner_index + start).numpy()
    for name in keep_columns:
        columns[name] = [batch[name][i] for i in owner]
    return columns


def _autocast(model):
    device = next(model.vision_model.parameters()).device
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
