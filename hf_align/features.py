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

Speed and scale-out: decoding, the image processor and the tokenizer run in `num_workers` DataLoader worker processes
while the encoders run (pinned memory and non-blocking copies on CUDA, bf16 autocast and SDPA attention there); the
device starts on batch i + 1 before batch i's outputs are copied back and written. Captions are sorted by token length
within a batch of images and encoded `batch_size` at a time, which cuts padding when images have several captions; the
rows are written in the source order. Under `accelerate launch` (or `torchrun`) with several processes, each process
encodes a contiguous run of the batches into a shard and the main process concatenates the shards in rank order, so
the cache holds the rows of a one-process run, in the same order. Memory does not grow with the dataset: batches
stream from the (memory-mapped) source to the Arrow file.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
SHARD_PREFIX = "shard-"  # per-process part of a cache extracted by several processes, before concatenation


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


def column_array(dataset: datasets.Dataset, name: str) -> np.ndarray:
    """A column as one numpy array (n, ...), read in one go.

    `dataset[name]` is a lazy `Column` in datasets ≥ 4: `torch.as_tensor` / `np.asarray` / iterating it format one row
    at a time, minutes for a million rows; this reads the Arrow column at once (honouring `select` / `filter`).
    """
    return dataset.with_format("numpy", columns=[name])[:][name]


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
        columns[layer_column("text", layer, tokens=True)] = [
            row[m].half().numpy() for row, m in zip(x, text_mask.bool())
        ]
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
    # Pooled features and ids go to Arrow as whole buffers: `Dataset.from_dict` encodes a 2-D array row by row, which
    # takes minutes for a million rows. The other columns (tokens, extras) are few or small and take that path.
    fixed = [name for name in columns if name == "image_id" or name.startswith(("vision_layer_", "text_layer_"))]
    table = datasets.table.InMemoryTable.from_pydict({name: _arrow_array(columns[name]) for name in fixed})
    dataset = datasets.Dataset(
        table, info=datasets.DatasetInfo(features=datasets.Features({k: schema[k] for k in fixed}))
    )
    rest = [name for name in columns if name not in fixed]
    if rest:
        others = datasets.Dataset.from_dict(
            {k: columns[k] for k in rest}, features=datasets.Features({k: schema[k] for k in rest})
        )
        dataset = datasets.concatenate_datasets([dataset, others], axis=1).select_columns(list(schema))
    return dataset


def _arrow_array(values: np.ndarray):
    """(n,) -> an Arrow array; (n, d) -> a fixed-size list array of length d (what `List(..., length=d)` stores)."""
    import pyarrow as pa

    if values.ndim == 1:
        return pa.array(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), values.shape[1])


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
    num_workers: int | None = None,
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
        batch_size: images per encoder forward pass; captions are sorted by length and encoded `batch_size` at a time.
        cache_dir: where caches live (default `$HF_ALIGN_CACHE` or `~/.cache/hf_align/features`).
        max_text_length: tokenizer truncation length (default: the smaller of the tokenizer's maximum and the text
            encoder's number of positions). Longer captions are truncated with a warning naming their rows.
        cache_path: the exact cache folder to use instead of `<cache_dir>/<fingerprint>` (e.g. a cache extracted
            earlier or copied from another machine). It is read when it holds a cache of exactly these inputs, and
            written when it does not exist; anything else raises `FeatureCacheError` naming what differs.
        on_bad_sample: `"raise"` (default): a sample that cannot be encoded raises `BadSampleError` naming its row
            and the problem. `"skip"`: it is left out, its row and reason are logged and recorded in the cache
            metadata (read them back with `skipped_samples`). See the module docstring for what counts as bad.
        num_workers: worker processes decoding and preprocessing batches while the encoders run; default
            `min(4, os.cpu_count())` when the encoders are on a GPU, 0 (this process) when they run on the CPU, whose
            cores they would take. The cache does not depend on it.

    Under `accelerate launch` / `torchrun` with several processes, call it in every process: each encodes its share on
    its own device, and every process gets the same cache (see the module docstring).

    Returns:
        The cache (see the module docstring for its columns). A second call with the same inputs loads it from disk
        and runs no encoder. A cache under `cache_dir` found unfinished or damaged is rebuilt (with a warning).
    """
    _check_extraction_inputs(model, processor, dataset, image_column, text_column, keep_columns, batch_size)
    if on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}")
    if num_workers is not None and (
        not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0
    ):
        raise ValueError(f"num_workers must be None or an int >= 0, got {num_workers!r}")
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
    state = process_state()
    if state.num_processes > 1:
        # The main process's inputs name the cache for all (an in-memory dataset's fingerprint can differ between
        # processes), and each process encodes on its own device.
        parts, target = _broadcast([parts, target])
        if next(model.vision_model.parameters()).device != state.device:
            model.to(state.device)
    if _on_main(state, lambda: _reuse_or_clear(target, parts, cache_path)):
        logger.info(f"reusing feature cache {target}")
        return load_cache(target, parts, verify_checksum=False)  # verified by _reuse_or_clear just now
    tmp = _on_main(state, lambda: _new_partial_folder(target))
    try:
        n_rows, skipped = _write_features(
            model,
            processor,
            dataset,
            image_column,
            text_column,
            layers,
            token_layers,
            pooled,
            keep_columns,
            batch_size,
            max_text_length,
            tmp,
            on_bad_sample,
            num_workers,
            state,
        )
        _on_main(state, lambda: _finish_cache(tmp, target, parts, n_rows, skipped))
    except BaseException:
        if state.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_cache(target, parts)


def _reuse_or_clear(target: str, parts: dict, cache_path) -> bool:
    """True when `target` holds a finished cache of exactly `parts` (size and checksum verified); otherwise clears the
    way for a new one (a damaged or unfinished cache under `cache_dir` is removed, one at `cache_path` is refused)."""
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
        return True
    if os.path.exists(target):
        if cache_path is not None:
            raise FeatureCacheError(
                f"cache_path={target!r} exists but is not a finished hf_align feature cache (no {META_FILE}); remove "
                "it or give another cache_path"
            )
        logger.warning(f"rebuilding {target}: an unfinished feature cache (no {META_FILE})")
        shutil.rmtree(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    return False


def _new_partial_folder(target: str) -> str:
    # Host and pid in the name: a later run can tell a dead extraction's leftovers from a live one's.
    tmp = f"{target}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _finish_cache(tmp: str, target: str, parts: dict, n_rows: int, skipped: list[dict]) -> None:
    """Concatenate the processes' shards (if any) in rank order, write the metadata last, rename `tmp` to `target`."""
    shards = sorted(name for name in os.listdir(tmp) if name.startswith(SHARD_PREFIX))
    if shards:
        _concatenate_arrow([os.path.join(tmp, name) for name in shards], os.path.join(tmp, DATA_FILE))
        for name in shards:
            os.remove(os.path.join(tmp, name))
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


def _concatenate_arrow(paths: list[str], path: str) -> None:
    """Write the rows of the Arrow files `paths`, in that order, to one Arrow file, a record batch at a time."""
    import pyarrow as pa

    first = datasets.Dataset.from_file(paths[0])
    writer = ArrowWriter(path=path, features=first.features)
    try:
        for shard in paths:
            for batch in datasets.Dataset.from_file(shard).data.to_batches():
                writer.write_table(pa.Table.from_batches([batch]))
        writer.finalize()
    finally:
        writer.close()


# ---------------------------------------------------------------------------------------------- processes
def cpu_process_group() -> bool:
    """Whether this process is one of several launched (`accelerate launch`, `torchrun`) on a machine without CUDA:
    Accelerate then has to be told `cpu=True` to join them in a gloo group instead of running each alone."""
    from accelerate.utils import parse_flag_from_env

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return parse_flag_from_env("ACCELERATE_USE_CPU") or (launched and not torch.cuda.is_available())


def process_state():
    """Accelerate's `PartialState`: one process, or this process's rank, count and device under a launcher."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_process_group())


def _broadcast(objects: list) -> list:
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list(objects, from_process=0)


def _on_main(state, work: Callable[[], Any]) -> Any:
    """`work()` run by the main process only; every process gets its (picklable) result, or raises its exception
    (which the other processes would otherwise never hear of, waiting forever for the main one)."""
    if state.num_processes == 1:
        return work()
    outcome, error = [None], None
    if state.is_main_process:
        try:
            outcome = [(True, work())]
        except Exception as err:
            outcome, error = [(False, err)], err
    succeeded, value = _broadcast(outcome)[0]
    if not succeeded:
        raise error or value
    return value


def _on_every_process(work: Callable[[], tuple[int, list]]) -> tuple[int, list]:
    """`work() -> (n_rows, skipped)` run by every process: the totals, skipped samples in rank order, everywhere; or,
    if any process failed, its error everywhere (the lowest failing rank's where this process did not fail)."""
    from accelerate.utils import gather_object

    try:
        outcome = (True, work())
    except Exception as err:
        outcome = (False, err)
    outcomes = gather_object([outcome])
    failures = [value for succeeded, value in outcomes if not succeeded]
    if failures:
        raise outcome[1] if not outcome[0] else failures[0]
    return sum(value[0] for _, value in outcomes), [sample for _, value in outcomes for sample in value[1]]


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
        raise ValueError(
            "extract_features needs an AlignerModel with encoders attached (from_encoders/from_pretrained)"
        )
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


@dataclass(frozen=True)
class _Plan:
    """What an extraction reads and stores; shared by the preprocessing workers and the encoding loop."""

    image_column: str
    text_column: str
    keep_columns: tuple[str, ...]
    layers: dict  # modality -> pooled layers
    token_layers: dict  # modality -> token layers
    pooled: dict  # modality -> pooling of the pooled columns
    batch_size: int
    text_limit: int
    on_bad_sample: str


def _write_features(
    model,
    processor,
    dataset,
    image_column,
    text_column,
    layers,
    token_layers,
    pooled,
    keep_columns,
    batch_size,
    max_text_length,
    folder,
    on_bad_sample,
    num_workers,
    state,
) -> tuple[int, list[dict]]:
    """Encode the rows into Arrow files in `folder`; returns the number of cache rows and the skipped samples.

    One process writes `folder/features.arrow`. Under several processes, process r encodes a contiguous run of the
    batches into `folder/shard-<r>.arrow`, which `_finish_cache` concatenates in rank order: the batches are those of
    a one-process run, so are the rows, their order and their values.
    """
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
    plan = _Plan(
        image_column,
        text_column,
        tuple(keep_columns),
        layers,
        token_layers,
        pooled,
        batch_size,
        text_limit,
        on_bad_sample,
    )
    n_batches = math.ceil(n_images / batch_size)
    rank, world = state.process_index, state.num_processes
    batches = range(n_batches * rank // world, n_batches * (rank + 1) // world)
    path = os.path.join(folder, DATA_FILE if world == 1 else f"{SHARD_PREFIX}{rank:05d}.arrow")
    shard_images = min(n_images, batches.stop * batch_size) - batches.start * batch_size if batches else 0
    progress = tqdm(
        total=shard_images,
        desc=f"hf_align: extracting features (~{estimate / 2**20:.0f} MiB)",
        unit="img",
        disable=not state.is_main_process,
    )

    def encode() -> tuple[int, list[dict]]:
        try:
            return _encode_batches(model, processor, dataset, plan, batches, num_workers, path, schema, progress)
        finally:
            progress.close()

    n_rows, skipped = encode() if world == 1 else _on_every_process(encode)
    if n_rows == 0:
        raise BadSampleError(f"every sample of the dataset was bad and skipped; first: {skipped[0]}")
    return n_rows, skipped


def _encode_batches(model, processor, dataset, plan: _Plan, batches: range, num_workers, path, schema, progress):
    """Encode the source batches `batches` (indices of `plan.batch_size`-row slices) into an Arrow file at `path`.

    Returns the number of rows written and the samples skipped. Preprocessing runs in `num_workers` DataLoader
    workers; the device starts on batch i + 1 before batch i's outputs are waited for and written.
    """
    device = next(model.vision_model.parameters()).device
    if num_workers is None:
        # On a GPU the workers keep decoding off the device's critical path; on CPU they would take cores from the
        # encoders' forward pass (2 workers ran at 0.65x the speed of none on 2 cores: benchmarks/RESULTS.md).
        num_workers = min(4, os.cpu_count() or 1) if device.type == "cuda" else 0
    loader = torch.utils.data.DataLoader(
        _SourceBatches(dataset, plan.batch_size, batches),
        batch_size=None,  # an item is already a batch
        collate_fn=_Preprocessor(processor, plan),
        num_workers=num_workers if len(batches) > 1 else 0,  # a single batch has nothing to overlap with
        pin_memory=device.type == "cuda",
    )
    writer = ArrowWriter(path=path, features=schema)
    n_rows, skipped, pending = 0, [], None
    try:
        for prepared in loader:
            launched = _launch(model, prepared, plan, device)
            if pending is not None:
                n_rows += _collect(pending, plan, writer, skipped)
                progress.update(pending["prepared"]["n_source"])
            pending = launched
        if pending is not None:
            n_rows += _collect(pending, plan, writer, skipped)
            progress.update(pending["prepared"]["n_source"])
        writer.finalize()
    finally:
        writer.close()
    return n_rows, skipped


class _SourceBatches(torch.utils.data.Dataset):
    """Item i: `(start, dataset[start : start + batch_size])` for the i-th batch index of `batches`."""

    def __init__(self, dataset: datasets.Dataset, batch_size: int, batches: range):
        self.dataset, self.batch_size, self.batches = dataset, batch_size, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        start = self.batches[i] * self.batch_size
        return start, self.dataset[start : start + self.batch_size]


class _Preprocessor:
    """The DataLoader's collate function: `_prepare_batch` with this extraction's processor and plan."""

    def __init__(self, processor, plan: _Plan):
        self.processor, self.plan = processor, plan

    def __call__(self, item) -> dict:
        start, batch = item
        return _prepare_batch(self.processor, self.plan, start, batch)


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


def _prepare_batch(processor, plan: _Plan, start: int, batch: dict) -> dict:
    """Decode, check and preprocess the source rows `start, start + 1, ...` in `batch` (CPU work, run in a worker).

    Returns a dict:
        rejects: `(position in batch, reason, caption index or None)` of each bad sample, in row order; a bad sample
            never reaches the encoders' batch, so it cannot poison the other rows.
        positions: index in `batch` of each usable image; owner: index into those images of each caption;
            caption_ids: index of each caption in its row's list (None for a single caption); keep: the
            `keep_columns` values of each caption.
        pixel_values: (n_images, C, H, W) of the usable images, or None when there is none.
        text_chunks: the captions sorted by token length (stable), tokenized `batch_size` at a time, each chunk padded
            to its own longest; text_order: (n_captions,) caption index of each sorted row.
        truncated: `(row, tokens)` of each caption cut to `plan.text_limit` tokens; n_source: rows in `batch`.
    """
    rejects, images, positions, captions, owner, caption_ids = [], [], [], [], [], []
    for i, (value, caption) in enumerate(zip(batch[plan.image_column], batch[plan.text_column])):
        try:
            image = _rgb_image(value)
        except ValueError as err:
            rejects.append((i, f"{plan.image_column!r}: {err}", None))
            continue
        group = caption if isinstance(caption, list) else [caption]
        if not group:
            rejects.append((i, f"{plan.text_column!r} holds an empty list of captions", None))
            continue
        texts = []
        for k, text in enumerate(group):
            index = k if isinstance(caption, list) else None
            try:
                texts.append((index, _caption_text(text)))
            except ValueError as err:
                rejects.append((i, f"{plan.text_column!r}: {err}", index))
        for index, text in texts:
            captions.append(text)
            owner.append(len(images))
            caption_ids.append(index)
        if texts:
            images.append(image)
            positions.append(i)
    prepared = {
        "start": start,
        "n_source": len(batch[plan.image_column]),
        "rejects": rejects,
        "positions": positions,
        "owner": owner,
        "caption_ids": caption_ids,
        "keep": {name: [batch[name][positions[o]] for o in owner] for name in plan.keep_columns},
        "pixel_values": None,
        "text_chunks": [],
        "text_order": None,
        "truncated": [],
    }
    if not images:
        return prepared
    tokenizer = processor.tokenizer
    prepared["truncated"] = _truncated_captions(
        tokenizer, captions, [start + positions[o] for o in owner], plan.text_limit
    )
    prepared["pixel_values"] = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    ids = tokenizer(captions, truncation=True, max_length=plan.text_limit, return_attention_mask=False)["input_ids"]
    order = sorted(range(len(captions)), key=lambda c: len(ids[c]))
    for s in range(0, len(order), plan.batch_size):
        chunk = [captions[c] for c in order[s : s + plan.batch_size]]
        inputs = tokenizer(chunk, padding=True, truncation=True, max_length=plan.text_limit, return_tensors="pt")
        prepared["text_chunks"].append(dict(inputs))
    prepared["text_order"] = torch.tensor(order)
    return prepared


@torch.no_grad()
def _launch(model, prepared: dict, plan: _Plan, device: torch.device) -> dict:
    """Start encoding a prepared batch without waiting for it: inputs go to the device, the encoders run, the tapped
    layers are pooled and copied back (on CUDA into pinned memory, asynchronously; `event` marks the copies' end).

    Returns `{"prepared", "outputs", "event"}`; outputs: column name -> (n_images, ...) vision or (n_captions, ...)
    text tensors in caption order, except text token columns: a list of (chunk, T_chunk, d) tensors in sorted order.
    """
    launched = {"prepared": prepared, "outputs": None, "event": None}
    if prepared["pixel_values"] is None:
        return launched
    autocast = _autocast(model)
    has_cls = model.config.vision_has_cls
    outputs: dict[str, Any] = {}
    with autocast:
        vision_states = model.vision_hidden_states(prepared["pixel_values"].to(device, non_blocking=True))
    for layer in plan.layers["vision"]:
        values, _ = pool_vision(vision_states[layer].float(), plan.pooled["vision"], has_cls)
        outputs[layer_column("vision", layer)] = values
    for layer in plan.token_layers["vision"]:
        values, _ = pool_vision(vision_states[layer], "tokens", has_cls)
        outputs[layer_column("vision", layer, tokens=True)] = values.half()
    del vision_states
    text_pooled = {layer: [] for layer in plan.layers["text"]}
    text_tokens = {layer: [] for layer in plan.token_layers["text"]}
    for chunk in prepared["text_chunks"]:
        inputs = {name: value.to(device, non_blocking=True) for name, value in chunk.items()}
        with autocast:
            states = model.text_hidden_states(
                inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids")
            )
        for layer, pieces in text_pooled.items():
            pieces.append(pool_text(states[layer].float(), inputs["attention_mask"], plan.pooled["text"])[0])
        for layer, pieces in text_tokens.items():
            pieces.append(states[layer].half())
    caption_row = torch.argsort(prepared["text_order"]).to(device)  # sorted row of each caption
    for layer, pieces in text_pooled.items():
        outputs[layer_column("text", layer)] = torch.cat(pieces)[caption_row]
    for layer, pieces in text_tokens.items():
        outputs[layer_column("text", layer, tokens=True)] = pieces
    # Non-blocking device-to-host copies land in pinned memory; a no-op on CPU.
    launched["outputs"] = {
        name: [v.to("cpu", non_blocking=True) for v in value]
        if isinstance(value, list)
        else value.to("cpu", non_blocking=True)
        for name, value in outputs.items()
    }
    if device.type == "cuda":
        launched["event"] = torch.cuda.Event()
        launched["event"].record()
    return launched


def _collect(launched: dict, plan: _Plan, writer: ArrowWriter, skipped: list[dict]) -> int:
    """Wait for a launched batch, apply the bad-sample policy, write its rows; returns the number of rows written.

    Under `on_bad_sample="raise"` the first bad sample raises `BadSampleError` naming its row; under `"skip"` it is
    appended to `skipped`. Rows whose encoder output holds NaN/Inf are bad samples too and are never written.
    """
    prepared = launched["prepared"]
    start = prepared["start"]

    def reject(position: int, reason: str, caption: int | None = None) -> None:
        where = f"row {start + position}" + ("" if caption is None else f", caption {caption}")
        if plan.on_bad_sample == "raise":
            raise BadSampleError(f"{where}: {reason} (on_bad_sample='skip' leaves such samples out)")
        skipped.append({"row": start + position, "caption": caption, "reason": reason})

    for position, reason, caption in prepared["rejects"]:
        reject(position, reason, caption)
    if launched["outputs"] is None:
        return 0
    _log_truncated(prepared["truncated"], plan.text_limit)
    if launched["event"] is not None:
        launched["event"].synchronize()
    outputs, positions, owner = launched["outputs"], prepared["positions"], prepared["owner"]
    owner_index = np.asarray(owner)
    columns: dict[str, Any] = {}
    bad_images: dict[int, str] = {}  # index into the usable images -> reason
    bad_captions: dict[int, str] = {}  # index into the captions -> reason
    for layer in plan.layers["vision"]:
        name = layer_column("vision", layer)
        _note_non_finite(bad_images, outputs[name], f"NaN or Inf in the vision encoder's output at layer {layer}")
        columns[name] = outputs[name].numpy()[owner_index]
    for layer in plan.layers["text"]:
        name = layer_column("text", layer)
        _note_non_finite(bad_captions, outputs[name], f"NaN or Inf in the text encoder's output at layer {layer}")
        columns[name] = outputs[name].numpy()
    float16 = "stored as float16, so |x| > 65504 overflows"
    for layer in plan.token_layers["vision"]:
        name = layer_column("vision", layer, tokens=True)
        _note_non_finite(bad_images, outputs[name], f"NaN or Inf in the vision tokens at layer {layer} ({float16})")
        columns[name] = outputs[name].numpy()[owner_index]
    order = prepared["text_order"].tolist() if prepared["text_order"] is not None else []
    for layer in plan.token_layers["text"]:
        name = layer_column("text", layer, tokens=True)
        rows, finite = [None] * len(order), []
        sorted_rows = []
        for state, chunk in zip(outputs[name], prepared["text_chunks"]):
            mask = chunk["attention_mask"].bool()
            real = state.masked_fill(~mask[..., None], 0)  # padding positions are never stored
            finite.append(torch.isfinite(real).flatten(1).all(1))
            sorted_rows += [row[m].numpy() for row, m in zip(state, mask)]
        finite = torch.cat(finite)
        for sorted_row, caption in enumerate(order):
            rows[caption] = sorted_rows[sorted_row]
            if not finite[sorted_row]:
                bad_captions.setdefault(caption, f"NaN or Inf in the text tokens at layer {layer} ({float16})")
        columns[name] = rows
    for image, reason in bad_images.items():
        reject(positions[image], reason)
    for row, reason in bad_captions.items():
        if owner[row] not in bad_images:
            reject(positions[owner[row]], reason, prepared["caption_ids"][row])
    columns["image_id"] = np.asarray([start + positions[o] for o in owner], dtype=np.int64)
    columns.update(prepared["keep"])
    keep = [r for r in range(len(owner)) if owner[r] not in bad_images and r not in bad_captions]
    if not keep:
        return 0
    if len(keep) < len(owner):
        columns = {name: _take(values, keep) for name, values in columns.items()}
    writer.write_batch(columns)
    return len(keep)


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


def _truncated_captions(tokenizer, captions: list[str], rows: list[int], limit: int) -> list[tuple[int, int]]:
    """`(row, tokens)` of the captions longer than `limit` tokens."""
    # A token spans at least one UTF-8 byte (plus a few special / word-start tokens), so only captions about this
    # long can be cut: count just those without truncation.
    long = [i for i, text in enumerate(captions) if len(text.encode("utf-8")) + 8 > limit]
    if not long:
        return []
    lengths = [len(ids) for ids in tokenizer([captions[i] for i in long], truncation=False, verbose=False)["input_ids"]]
    return [(rows[i], n) for i, n in zip(long, lengths) if n > limit]


def _log_truncated(cut: list[tuple[int, int]], limit: int) -> None:
    # Logged by the main process: a worker's log records would not reach the caller's handlers.
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
