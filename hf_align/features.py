"""The feature cache: frozen encoder outputs extracted once, stored as an Arrow-backed `datasets.Dataset` on disk.

Layout of a cache (one row per image–caption pair; an image with several captions gives several rows):

* `vision_layer_{l}` / `text_layer_{l}`: pooled features of hidden state `l` (absolute index), float32 (d,).
* `vision_tokens_layer_{l}`: patch tokens (T, d) float16; `text_tokens_layer_{l}`: the caption's non-padding tokens
  (T_i, d) float16, variable length. Stored only for token poolings.
* `image_id`: int64 id of the source image (the row of the source dataset); captions of one image share it.
* any `keep_columns` of the source dataset (e.g. `label`), repeated per caption.

A cache lives in `<cache_dir>/<fingerprint>/` (or the `cache_path` you give) and is written under a temporary name,
then renamed, so a crash never leaves a half-written cache behind. The fingerprint covers the encoders (id, revision or
local weights), layers, poolings, the image processor and tokenizer settings, the columns, the bad-sample policy and
the source dataset's own fingerprint. `hf_align_cache.json` records those parts, the row count, the Arrow file's size
and SHA-256, and the samples left out: every load checks the size (and the checksum when cheap, or on request), so a
truncated or edited cache is refused instead of read.

Bad samples (`on_bad_sample`): images are decoded one by one and converted to RGB (grayscale, palette, CMYK, 16-bit and
float images are rescaled; transparency is composited on white as CLIP's processor does; sides over
`MAX_IMAGE_SIDE` are box-downsampled first), and captions over the text encoder's length limit are truncated with a
warning. What cannot be encoded (an undecodable or empty image, a missing / empty / non-text / non-UTF-8 caption, NaN
or Inf in the encoder's output) raises `BadSampleError` naming its row by default; `on_bad_sample="skip"` leaves it
out, logs it and records it in the metadata (`skipped_samples`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import socket
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import torch
from datasets.arrow_writer import ArrowWriter
from transformers.utils import logging

from .encoders import non_finite_rows, pool_text, pool_vision

logger = logging.get_logger(__name__)

CACHE_FORMAT_VERSION = 2  # 2: the metadata records the data file's size and SHA-256, and the skipped samples
META_FILE = "hf_align_cache.json"
DATA_FILE = "features.arrow"
BAD_SAMPLE_POLICIES = ("raise", "skip")
MAX_IMAGE_SIDE = 4096  # larger images are box-downsampled before the image processor (which resizes them anyway)
CHECKSUM_AUTO_BYTES = 256 * 2**20  # load_cache verifies the SHA-256 by default up to this size (about a second)


class FeatureCacheError(ValueError):
    """A cache folder that must not be read: built for other inputs, unfinished, truncated or modified on disk."""


class BadSampleError(ValueError):
    """A dataset sample `extract_features` cannot encode; the message names its row (and caption) and the problem."""


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
    cache_path: str | os.PathLike | None = None,
    on_bad_sample: str = "raise",
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
        max_text_length: tokenizer truncation length (default: the smaller of the tokenizer's maximum and the text
            encoder's number of positions). Longer captions are truncated with a warning naming their rows.
        cache_path: the exact cache folder to use instead of `<cache_dir>/<fingerprint>` (e.g. a cache extracted
            earlier or copied from another machine). It is read when it holds a cache of exactly these inputs, and
            written when it does not exist; anything else raises `FeatureCacheError` naming what differs.
        on_bad_sample: `"raise"` (default): a sample that cannot be encoded raises `BadSampleError` naming its row
            and the problem. `"skip"`: it is left out, its row and reason are logged and recorded in the cache
            metadata (read them back with `skipped_samples`). See the module docstring for what counts as bad.

    Returns:
        The cache (see the module docstring for its columns). A second call with the same inputs loads it from disk
        and runs no encoder. A cache under `cache_dir` found unfinished or damaged is rebuilt (with a warning).
    """
    _check_extraction_inputs(model, processor, dataset, image_column, text_column, keep_columns, batch_size)
    if on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}")
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
        "on_bad_sample": on_bad_sample,
    }
    fingerprint = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]
    target = os.path.abspath(os.fspath(cache_path or os.path.join(cache_dir or default_cache_dir(), fingerprint)))
    _remove_stale_partial_caches(target)
    try:
        cached = load_cache(target, parts)
    except FeatureCacheError as err:
        if cache_path is not None:  # a folder the user named is never deleted for them
            raise
        logger.warning(f"rebuilding: {err}")
        shutil.rmtree(target)
        cached = None
    if cached is not None:
        logger.info(f"reusing feature cache {target}")
        return cached
    if os.path.exists(target):
        if cache_path is not None:
            raise FeatureCacheError(
                f"cache_path={target!r} exists but is not a finished hf_align feature cache (no {META_FILE}); remove "
                "it or give another cache_path"
            )
        logger.warning(f"rebuilding {target}: an unfinished feature cache (no {META_FILE})")
        shutil.rmtree(target)

    os.makedirs(os.path.dirname(target), exist_ok=True)
    # Host and pid in the name: a later run can tell a dead extraction's leftovers from a live one's.
    tmp = f"{target}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        n_rows, skipped = _write_features(
            model, processor, dataset, image_column, text_column, layers, token_layers, pooled, keep_columns,
            batch_size, max_text_length, os.path.join(tmp, DATA_FILE), on_bad_sample,
        )  # fmt: skip
        if skipped:
            rows = sorted({sample["row"] for sample in skipped})
            logger.warning(
                f"on_bad_sample='skip': left out {len(skipped)} sample(s), rows {rows[:20]} (reasons recorded in "
                f"{os.path.join(target, META_FILE)}); first: {skipped[0]['reason']}"
            )
        meta = {
            "parts": parts,
            "num_rows": n_rows,
            "complete": True,
            "data_file": _file_record(os.path.join(tmp, DATA_FILE)),
            "skipped": skipped,
        }
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as handle:
            json.dump(meta, handle, default=str)
        if os.path.isdir(target):  # a concurrent writer finished first; theirs is identical
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_cache(target, parts)


def load_cache(path: str, parts: dict | None = None, verify_checksum: bool | None = None) -> datasets.Dataset | None:
    """Open a finished cache folder; `None` if there is none (no `hf_align_cache.json`).

    Raises `FeatureCacheError` when `parts` (when given) differ from what the cache was built for (naming each
    differing part with both values), or when the data file is not the one written: its size is checked on every
    load, its SHA-256 when `verify_checksum=True`, or by default (`None`) when the file is at most
    `CHECKSUM_AUTO_BYTES`.
    """
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        return None
    try:
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FeatureCacheError(f"feature cache {path!r}: {META_FILE} is unreadable ({err}); re-extract it") from err
    if parts is not None:
        expected = json.loads(json.dumps(parts, default=str))
        differences = _differences("", meta.get("parts", {}), expected)
        if differences:
            raise FeatureCacheError(
                f"feature cache {path!r} was built for other inputs: " + "; ".join(differences) + ". Use the "
                "inputs it was built for, or another cache folder"
            )
    record = meta.get("data_file")
    if not isinstance(record, dict):
        raise FeatureCacheError(
            f"feature cache {path!r} has no size/checksum record (written by an older hf_align); re-extract it"
        )
    data_path = os.path.join(path, DATA_FILE)
    size = os.path.getsize(data_path) if os.path.isfile(data_path) else None
    if size != record["size"]:
        found = "is missing" if size is None else f"is {size} bytes"
        raise FeatureCacheError(
            f"feature cache {path!r} is damaged: {DATA_FILE} {found}, {record['size']} bytes were written "
            "(truncated or modified after extraction); delete the folder to re-extract"
        )
    if verify_checksum or (verify_checksum is None and size <= CHECKSUM_AUTO_BYTES):
        digest = _file_record(data_path)["sha256"]
        if digest != record["sha256"]:
            raise FeatureCacheError(
                f"feature cache {path!r} is damaged: {DATA_FILE} has SHA-256 {digest}, {record['sha256']} was "
                "written (modified after extraction); delete the folder to re-extract"
            )
    dataset = datasets.Dataset.from_file(data_path)
    if len(dataset) != meta.get("num_rows"):
        raise FeatureCacheError(
            f"feature cache {path!r} is damaged: {len(dataset)} rows on disk, {meta.get('num_rows')} recorded"
        )
    return dataset


def skipped_samples(features: datasets.Dataset) -> list[dict]:
    """The samples `extract_features(..., on_bad_sample="skip")` left out of this cache: `{"row", "caption",
    "reason"}` each (`caption` = index in the row's caption list, or `None` for the whole row)."""
    files = features.cache_files
    meta_path = os.path.join(os.path.dirname(files[0]["filename"]), META_FILE) if files else None
    if meta_path is None or not os.path.isfile(meta_path):
        raise ValueError("features is not an extract_features cache on disk (no hf_align_cache.json beside it)")
    with open(meta_path, encoding="utf-8") as handle:
        return json.load(handle).get("skipped", [])


def _differences(prefix: str, recorded, expected) -> list[str]:
    """`part: recorded X, now Y` for each leaf where two JSON-like values differ (dicts are compared key by key)."""
    if isinstance(recorded, dict) and isinstance(expected, dict):
        out = []
        for key in sorted(set(recorded) | set(expected), key=str):
            if recorded.get(key) != expected.get(key):
                out += _differences(f"{prefix}.{key}" if prefix else str(key), recorded.get(key), expected.get(key))
        return out
    return [f"{prefix or 'parts'}: recorded {_short(recorded)}, now {_short(expected)}"]


def _short(value, limit: int = 200) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _file_record(path: str) -> dict:
    """Size and SHA-256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(8 * 2**20), b""):
            digest.update(chunk)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def _remove_stale_partial_caches(target: str) -> None:
    """Delete `<target>.tmp-<host>-<pid>` folders of extractions on this host whose process is gone."""
    parent, base = os.path.split(target)
    prefix = f"{base}.tmp-{socket.gethostname()}-"
    if not os.path.isdir(parent):
        return
    for name in os.listdir(parent):
        pid = name[len(prefix) :]
        if name.startswith(prefix) and pid.isdigit() and not _process_alive(int(pid)):
            logger.warning(f"removing {os.path.join(parent, name)}: left unfinished by a stopped extraction")
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if os.name != "posix":  # signal 0 is only a liveness probe on POSIX; elsewhere never delete
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


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
    batch_size, max_text_length, path, on_bad_sample,
) -> tuple[int, list[dict]]:  # fmt: skip
    """Encode every row into an Arrow file at `path`; returns the number of cache rows and the skipped samples."""
    from transformers.utils.logging import tqdm

    if isinstance(dataset.features.get(image_column), datasets.Image):
        # Decode each image ourselves (`_rgb_image`): datasets would decode a whole batch at once, so one corrupt
        # file would fail the batch without saying which row it was.
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    text_limit = _text_length_limit(model, processor.tokenizer, max_text_length)
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
    n_rows, skipped = 0, []
    progress = tqdm(total=n_images, desc=f"hf_align: extracting features (~{estimate / 2**20:.0f} MiB)", unit="img")
    try:
        for start in range(0, n_images, batch_size):
            batch = dataset[start : start + batch_size]
            columns, batch_skipped = _encode_batch(
                model, processor, batch, start, image_column, text_column, layers, token_layers, pooled,
                keep_columns, text_limit, on_bad_sample,
            )  # fmt: skip
            skipped += batch_skipped
            if columns is not None:
                writer.write_batch(columns)
                n_rows += len(columns["image_id"])
            progress.update(len(batch[image_column]))
        writer.finalize()
    finally:
        writer.close()
        progress.close()
    if n_rows == 0:
        raise BadSampleError(f"every sample of the dataset was bad and skipped; first: {skipped[0]}")
    return n_rows, skipped


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
    text_limit, on_bad_sample,
) -> tuple[dict[str, list] | None, list[dict]]:  # fmt: skip
    """Encode the source rows `start, start + 1, ...` in `batch`.

    Returns the cache columns (`None` when no row is left) and the samples skipped under `on_bad_sample="skip"`;
    under `"raise"` the first bad sample raises `BadSampleError`. A bad sample never reaches the encoders' batch (or,
    when the encoders make NaN/Inf of it, the cache), so it cannot poison the other rows.
    """
    skipped: list[dict] = []

    def reject(position: int, reason: str, caption: int | None = None) -> None:
        where = f"row {start + position}" + ("" if caption is None else f", caption {caption}")
        if on_bad_sample == "raise":
            raise BadSampleError(f"{where}: {reason} (on_bad_sample='skip' leaves such samples out)")
        skipped.append({"row": start + position, "caption": caption, "reason": reason})

    # images: usable images; positions: their index in `batch`; owner: index into `images` of each caption
    images, positions, captions, owner, caption_ids = [], [], [], [], []
    for i, (value, caption) in enumerate(zip(batch[image_column], batch[text_column])):
        try:
            image = _rgb_image(value)
        except ValueError as err:
            reject(i, f"{image_column!r}: {err}")
            continue
        group = caption if isinstance(caption, list) else [caption]
        if not group:
            reject(i, f"{text_column!r} holds an empty list of captions")
            continue
        texts = []
        for k, text in enumerate(group):
            index = k if isinstance(caption, list) else None
            try:
                texts.append((index, _caption_text(text)))
            except ValueError as err:
                reject(i, f"{text_column!r}: {err}", index)
        for index, text in texts:
            captions.append(text)
            owner.append(len(images))
            caption_ids.append(index)
        if texts:
            images.append(image)
            positions.append(i)
    if not images:
        return None, skipped

    _warn_truncated(processor.tokenizer, captions, [start + positions[o] for o in owner], text_limit)
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    text_inputs = processor.tokenizer(
        captions, padding=True, truncation=True, max_length=text_limit, return_tensors="pt"
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
    bad_images: dict[int, str] = {}  # index into `images` -> reason
    bad_captions: dict[int, str] = {}  # index into `captions` -> reason
    has_cls = model.config.vision_has_cls
    for layer in layers["vision"]:
        values, _ = pool_vision(vision_states[layer].float(), pooled["vision"], has_cls)
        _note_non_finite(bad_images, values, f"NaN or Inf in the vision encoder's output at layer {layer}")
        columns[layer_column("vision", layer)] = values.cpu()[owner_index].numpy()
    for layer in layers["text"]:
        values, _ = pool_text(text_states[layer].float(), attention_mask, pooled["text"])
        _note_non_finite(bad_captions, values, f"NaN or Inf in the text encoder's output at layer {layer}")
        columns[layer_column("text", layer)] = values.cpu().numpy()
    float16 = "stored as float16, so |x| > 65504 overflows"
    for layer in token_layers["vision"]:
        values, _ = pool_vision(vision_states[layer], "tokens", has_cls)
        values = values.half().cpu()
        _note_non_finite(bad_images, values, f"NaN or Inf in the vision tokens at layer {layer} ({float16})")
        columns[layer_column("vision", layer, tokens=True)] = values[owner_index].numpy()
    for layer in token_layers["text"]:
        state = text_states[layer].half().cpu()
        mask = attention_mask.bool().cpu()
        real = state.masked_fill(~mask[..., None], 0)  # padding positions are never stored
        _note_non_finite(bad_captions, real, f"NaN or Inf in the text tokens at layer {layer} ({float16})")
        columns[layer_column("text", layer, tokens=True)] = [row[m].numpy() for row, m in zip(state, mask)]
    for image, reason in bad_images.items():
        reject(positions[image], reason)
    for row, reason in bad_captions.items():
        if owner[row] not in bad_images:
            reject(positions[owner[row]], reason, caption_ids[row])
    columns["image_id"] = np.asarray([start + positions[o] for o in owner], dtype=np.int64)
    for name in keep_columns:
        columns[name] = [batch[name][positions[o]] for o in owner]
    keep = [r for r in range(len(captions)) if owner[r] not in bad_images and r not in bad_captions]
    if not keep:
        return None, skipped
    if len(keep) < len(captions):
        columns = {name: _take(values, keep) for name, values in columns.items()}
    return columns, skipped


def _note_non_finite(bad: dict[int, str], values: torch.Tensor, reason: str) -> None:
    for row in non_finite_rows(values):
        bad.setdefault(row, reason)


def _take(values, rows: list[int]):
    return values[rows] if isinstance(values, np.ndarray) else [values[r] for r in rows]


# ---------------------------------------------------------------------------------------------- odd input
_HIGH_DEPTH_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")


def _rgb_image(value):
    """Whatever an image column holds, as an RGB PIL image; `ValueError` says why it cannot be one.

    Accepts PIL images, `datasets.Image(decode=False)` dicts, encoded bytes, file paths and HWC/HW arrays.
    """
    from PIL import Image
    from transformers.image_transforms import convert_to_rgb

    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = value.get("bytes") or value.get("path")
    if value is None:
        raise ValueError("no image (None)")
    if isinstance(value, (bytes, bytearray, str, os.PathLike)):
        image = _decode_image(value)
    elif isinstance(value, Image.Image):
        image = _decode_image(value)  # a lazily opened file is only read (and found corrupt) on load()
    elif isinstance(value, np.ndarray):
        try:
            image = Image.fromarray(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"an array of shape {value.shape} and dtype {value.dtype} is not an image: {err}") from err
    else:
        raise ValueError(f"unsupported type {type(value).__name__}; give PIL images, encoded bytes or file paths")
    if min(image.size) < 1:
        raise ValueError(f"empty image ({image.size[0]}x{image.size[1]} px)")
    if image.mode in _HIGH_DEPTH_MODES:
        image = _to_8bit(image)
    if max(image.size) > MAX_IMAGE_SIDE:
        if image.mode in ("1", "P"):  # modes Image.reduce does not take
            image = Image.fromarray(convert_to_rgb(image, return_numpy=True))
        image = image.reduce(math.ceil(max(image.size) / MAX_IMAGE_SIDE))
    try:
        # transformers' helper: transparency is composited on white, as CLIP's image processor does
        return Image.fromarray(convert_to_rgb(image, return_numpy=True))
    except (ValueError, OSError) as err:
        raise ValueError(f"mode {image.mode!r} cannot be converted to RGB: {err}") from err


def _decode_image(source):
    from PIL import Image

    try:
        if isinstance(source, Image.Image):
            image = source
        else:
            image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
            image.draft(None, (MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))  # JPEG only: decode huge photos at 1/2 .. 1/8 scale
        image.load()
    except Exception as err:  # decoders raise OSError, SyntaxError, EOFError, struct.error, ... on corrupt data
        raise ValueError(f"cannot be decoded as an image ({type(err).__name__}: {err})") from err
    return image


def _to_8bit(image):
    """A 16-bit, 32-bit integer or float image as 8-bit grayscale, scaled by its nominal range (not its own max,
    so a dark 16-bit image stays dark): 65535 for 16-bit modes; 1, 255 or 65535 (the smallest that holds the
    values) for "F" and "I"."""
    from PIL import Image

    pixels = np.nan_to_num(np.asarray(image, dtype=np.float32))
    if image.mode.startswith("I;16"):
        top = 65535.0
    else:
        peak = float(pixels.max())
        candidates = (1.0 if image.mode == "F" else 255.0, 255.0, 65535.0, max(peak, 1.0))
        top = next(t for t in candidates if peak <= t)
    return Image.fromarray(np.clip(pixels * (255.0 / top) + 0.5, 0, 255).astype(np.uint8))


def _caption_text(value) -> str:
    """A caption as text; `ValueError` for None, non-text, bytes that are not UTF-8, or an empty caption."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            bad = bytes(value[err.start : err.start + 4])
            raise ValueError(f"the caption bytes are not valid UTF-8 (at byte {err.start}: {bad!r})") from err
    if value is None:
        raise ValueError("missing caption (None)")
    if not isinstance(value, str):
        raise ValueError(f"a caption must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError("empty caption")
    return value


def _text_length_limit(model, tokenizer, max_text_length: int | None) -> int:
    """Tokens a caption keeps: `max_text_length`, else the tokenizer's maximum; never more than the text encoder
    has positions for (a mismatched tokenizer would otherwise crash the encoder on a long caption)."""
    limit = max_text_length or tokenizer.model_max_length
    positions = getattr(model.text_model.config, "max_position_embeddings", None)
    return min(limit, positions) if isinstance(positions, int) else limit


def _warn_truncated(tokenizer, captions: list[str], rows: list[int], limit: int) -> None:
    # A token spans at least one UTF-8 byte (plus a few special / word-start tokens), so only captions about this
    # long can be cut: count just those without truncation.
    long = [i for i, text in enumerate(captions) if len(text.encode("utf-8")) + 8 > limit]
    if not long:
        return
    lengths = [len(ids) for ids in tokenizer([captions[i] for i in long], truncation=False, verbose=False)["input_ids"]]
    cut = [(rows[i], n) for i, n in zip(long, lengths) if n > limit]
    if cut:
        logger.warning(
            f"{len(cut)} caption(s) longer than the text encoder's limit of {limit} tokens were truncated to it: "
            f"rows {[row for row, _ in cut][:20]} (longest: {max(n for _, n in cut)} tokens)"
        )


def _autocast(model):
    device = next(model.vision_model.parameters()).device
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
