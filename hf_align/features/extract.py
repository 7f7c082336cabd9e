"""`extract_features`: run the frozen encoders once over a dataset and write their features to a cache on disk.

Bad samples (`on_bad_sample`): what cannot be encoded (an undecodable or empty image, a missing / empty / non-text /
non-UTF-8 caption, NaN or Inf in the encoder's output; see `hf_align.features.decode` for what is repaired instead)
raises `BadSampleError` naming its row by default; `on_bad_sample="skip"` leaves it out, logs it and records it in the
metadata (`skipped_samples`).

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

import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from datasets.arrow_writer import ArrowWriter
from transformers.utils import logging

from ..configuration import resolve_layer_index
from ..distributed import broadcast, on_every_process, on_main, process_state
from ..encoders import blank_pixel_values, non_finite_rows, read_tap, text_fixed_length
from ..taps import Tap, default_pooling, tap_width
from .decode import _log_truncated, _Preprocessor, _SourceBatches, _text_length_limit
from .schema import _features_schema, layer_column, tap_column
from .store import (
    CACHE_FORMAT_VERSION,
    DATA_FILE,
    SHARD_PREFIX,
    _fingerprint,
    _finish_cache,
    _local_signature,
    _new_partial_folder,
    _processor_signature,
    _reuse_or_clear,
    default_cache_dir,
    estimate_cache_bytes,
    load_cache,
)

logger = logging.get_logger(__name__)

__all__ = ["BAD_SAMPLE_POLICIES", "BadSampleError", "extract_features"]


BAD_SAMPLE_POLICIES = ("raise", "skip")


class BadSampleError(ValueError):
    """A dataset sample `extract_features` cannot encode; the message names its row (and caption) and the problem."""


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
        vision_layers / text_layers: hidden states to store pooled (for layer selection): `None` = the layer the
            model taps (the last one for taps after it; every layer when it is `"auto"`), `"all"`, or a list of
            hidden-state indices (negative allowed). They are pooled as the model's tap pools when it reads hidden
            states, else as `auto` pools them. What the model's tap reads is stored too (its token column for token
            methods, its own column for a source after the last layer: `hf_align.features.schema`). Everything
            comes from one forward pass per batch.
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
        The cache (its columns: `hf_align.features.schema`). A second call with the same inputs loads it from disk
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
        m: _requested_layers(m, requested, config)
        for m, requested in (("vision", vision_layers), ("text", text_layers))
    }
    reads = {m: _reads(model, m, layers[m]) for m in layers}
    pipeline = getattr(model.text_model, "pipeline", None)  # a sentence-transformers pipeline (through LoRA too)
    parts = {
        "format": CACHE_FORMAT_VERSION,
        "vision_encoder": [config.vision_encoder, config.vision_revision, _local_signature(config.vision_encoder)],
        "text_encoder": [config.text_encoder, config.text_revision, _local_signature(config.text_encoder)],
        "layers": layers,
        # Every stored column with the tap it reads (source, layer, pooling) and the prefix tokens it leaves out:
        # a cache extracted through one tap is never reused for another.
        "taps": {m: {name: read.signature() for name, read in reads[m].items()} for m in reads},
        "text_pipeline": pipeline.describe() if hasattr(pipeline, "describe") else None,
        "processor": _processor_signature(processor, max_text_length),
        "columns": [image_column, text_column, sorted(keep_columns)],
        "dataset": dataset._fingerprint,
        "on_bad_sample": on_bad_sample,
    }
    folder = cache_path or os.path.join(cache_dir or default_cache_dir(), _fingerprint(parts))
    target = os.path.abspath(os.fspath(folder))
    state = process_state()
    if state.num_processes > 1:
        # The main process's inputs name the cache for all (an in-memory dataset's fingerprint can differ between
        # processes), and each process encodes on its own device.
        parts, target = broadcast([parts, target])
        if next(model.vision_model.parameters()).device != state.device:
            model.to(state.device)
    if on_main(state, lambda: _reuse_or_clear(target, parts, cache_path)):
        logger.info(f"reusing feature cache {target}")
        return load_cache(target, parts, verify_checksum=False)  # verified by _reuse_or_clear just now
    tmp = on_main(state, lambda: _new_partial_folder(target))
    try:
        n_rows, skipped = _write_features(
            model,
            processor,
            dataset,
            image_column,
            text_column,
            reads,
            keep_columns,
            batch_size,
            max_text_length,
            tmp,
            on_bad_sample,
            num_workers,
            state,
        )
        on_main(state, lambda: _finish_cache(tmp, target, parts, n_rows, skipped))
    except BaseException:
        if state.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_cache(target, parts)


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
    num = getattr(config, f"{modality}_num_layers")
    if requested is None:
        requested = "all" if getattr(config, f"{modality}_layer") == "auto" else [config.absolute_layer(modality)]
    if requested == "all":
        return list(range(num))
    if isinstance(requested, (int, str)) or not all(isinstance(v, int) for v in requested):
        raise ValueError(f"{modality}_layers must be None, 'all' or a list of ints, got {requested!r}")
    return sorted({resolve_layer_index(f"{modality}_layers", v, num) for v in requested})


@dataclass(frozen=True)
class _Read:
    """One cache column: the tap it reads, the prefix tokens that tap leaves out, its width and, for messages, where
    in the encoder it comes from."""

    tap: Tap
    num_prefix_tokens: int
    width: int
    where: str

    @property
    def tokens(self) -> bool:
        return not self.tap.pooled

    def signature(self) -> str:
        """The tap and its prefix tokens in words (`hidden_states[2] · mean, 1 prefix token`): what the cache's
        fingerprint records of the column."""
        prefix = self.num_prefix_tokens
        return self.tap.describe() + (f", {prefix} prefix token{'s' if prefix > 1 else ''}" if prefix else "")


def _reads(model, modality: str, layers: list[int]) -> dict[str, _Read]:
    """The columns an extraction stores for `modality`, by name: the pooled hidden-state `layers`, and what the
    model's tap reads when that is not among them (token sequences, or a source after the last layer).

    The hidden states are pooled as the model's tap pools them when it reads hidden states (so its column is the one
    it trains on), else as `auto` pools hidden states (what layer selection then points the model at).
    """
    config = model.config
    info = model.encoder_info(modality)
    pooling = getattr(config, f"resolved_{modality}_pooling")
    prefix = config.num_prefix_tokens(modality)
    if getattr(config, f"{modality}_source") == "hidden_states" and pooling != "tokens":
        hidden_pooling, hidden_prefix = pooling, prefix
    else:
        hidden_pooling = default_pooling(info, modality, "hidden_states")
        hidden_prefix = info.num_prefix_tokens.get("hidden_states", 0) if modality == "vision" else 0
    reads = {
        layer_column(modality, layer): _Read(
            Tap(layer, "hidden_states", hidden_pooling), hidden_prefix, info.hidden_sizes[layer], f"layer {layer}"
        )
        for layer in layers
    }
    if getattr(config, f"{modality}_layer") == "auto":
        return reads  # layer selection first: the model reads nothing yet
    tap = config.tap(modality)
    name = tap_column(config, modality)
    if name not in reads:
        absolute = config.absolute_layer(modality)
        if tap.source == "hidden_states":
            tap, where = Tap(absolute, "hidden_states", tap.pooling), f"layer {absolute}"
        else:
            where = tap.source
        reads[name] = _Read(tap, prefix, tap_width(info, tap), where)
    return reads


@dataclass(frozen=True)
class _Plan:
    """What an extraction reads and stores; shared by the preprocessing workers and the encoding loop."""

    image_column: str
    text_column: str
    keep_columns: tuple[str, ...]
    reads: dict  # modality -> column name -> _Read
    text_passes: dict  # fixed text length (None: as tokenized) -> the text columns read from that pass
    batch_size: int
    text_limit: int
    on_bad_sample: str


def _write_features(
    model,
    processor,
    dataset,
    image_column,
    text_column,
    reads,
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
    pooled = {m: {name: r.width for name, r in reads[m].items() if not r.tokens} for m in reads}
    vision_tokens = {name: (_vision_token_count(model, r), r.width) for name, r in reads["vision"].items() if r.tokens}
    text_tokens = {name: r.width for name, r in reads["text"].items() if r.tokens}
    estimate = estimate_cache_bytes(
        n_images * captions_per_image,
        list(pooled["vision"].values()),
        list(pooled["text"].values()),
        next(iter(vision_tokens.values()), None),
        (32, next(iter(text_tokens.values()))) if text_tokens else None,
    )
    logger.info(f"extracting features of {n_images} images: estimated cache size {estimate / 2**20:.1f} MiB")
    schema = _features_schema(
        {**pooled["vision"], **pooled["text"]},
        vision_tokens,
        text_tokens,
        datasets.Features({c: dataset.features[c] for c in keep_columns}),
    )
    text_passes: dict[int | None, list[str]] = {}  # a SigLIP text tower's pooled taps need their own pass
    for name, read in reads["text"].items():
        text_passes.setdefault(text_fixed_length(model.text_model, read.tap), []).append(name)
    plan = _Plan(
        image_column,
        text_column,
        tuple(keep_columns),
        reads,
        text_passes,
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

    n_rows, skipped = encode() if world == 1 else on_every_process(encode)
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


def _vision_token_count(model, read: _Read) -> int:
    """Tokens per image of a vision token column (one blank image through the encoder)."""
    outputs = model.vision_outputs(blank_pixel_values(model.vision_model))
    return read_tap(outputs, read.tap, read.num_prefix_tokens)[0].shape[1]


# ---------------------------------------------------------------------------------------------- one batch
@torch.no_grad()
def _launch(model, prepared: dict, plan: _Plan, device: torch.device) -> dict:
    """Start encoding a prepared batch without waiting for it: inputs go to the device, the encoders run once per
    batch (text: once per chunk and input regime), every column's tap is read and copied back (on CUDA into pinned
    memory, asynchronously; `event` marks the copies' end).

    Returns `{"prepared", "outputs", "event"}`; outputs: column name -> (n_images, ...) vision or (n_captions, ...)
    text tensors in caption order, except text token columns: a list of ((chunk, T_chunk, d) tokens, (chunk, T_chunk)
    mask of the real ones) in sorted order.
    """
    launched = {"prepared": prepared, "outputs": None, "event": None}
    if prepared["pixel_values"] is None:
        return launched
    autocast = _autocast(model)
    outputs: dict[str, Any] = {}
    with autocast:
        vision = model.vision_outputs(prepared["pixel_values"].to(device, non_blocking=True))
    for name, read in plan.reads["vision"].items():
        if read.tokens:
            outputs[name] = read_tap(vision, read.tap, read.num_prefix_tokens)[0].half()
        else:  # pooled in float32 (the encoder may have run in bf16)
            outputs[name] = read_tap(vision, read.tap, read.num_prefix_tokens, dtype=torch.float32)[0]
    del vision
    pieces: dict[str, list] = {name: [] for name in plan.reads["text"]}
    for chunk in prepared["text_chunks"]:
        inputs = {name: value.to(device, non_blocking=True) for name, value in chunk.items()}
        for fixed_length, names in plan.text_passes.items():
            with autocast:
                text = model.text_outputs(
                    inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"), fixed_length
                )
            for name in names:
                read = plan.reads["text"][name]
                if read.tokens:  # the mask read_tap returns: padding moved to the right, as in the tokens
                    tokens, mask = read_tap(text, read.tap)
                    pieces[name].append((tokens.half(), mask))
                else:
                    pieces[name].append(read_tap(text, read.tap, dtype=torch.float32)[0])
    caption_row = torch.argsort(prepared["text_order"]).to(device)  # sorted row of each caption
    for name, values in pieces.items():
        outputs[name] = values if plan.reads["text"][name].tokens else torch.cat(values)[caption_row]
    # Non-blocking device-to-host copies land in pinned memory; a no-op on CPU.
    launched["outputs"] = {name: _to_host(value) for name, value in outputs.items()}
    if device.type == "cuda":
        launched["event"] = torch.cuda.Event()
        launched["event"].record()
    return launched


def _to_host(value):
    if isinstance(value, (list, tuple)):
        return type(value)(_to_host(v) for v in value)
    return value.to("cpu", non_blocking=True)


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
    for modality, bad in (("vision", bad_images), ("text", bad_captions)):
        for name, read in plan.reads[modality].items():
            if not read.tokens:
                _note_non_finite(bad, outputs[name], f"NaN or Inf in the {modality} encoder's output at {read.where}")
                columns[name] = outputs[name].numpy()[owner_index] if modality == "vision" else outputs[name].numpy()
    float16 = "stored as float16, so |x| > 65504 overflows"
    for name, read in plan.reads["vision"].items():
        if read.tokens:
            reason = f"NaN or Inf in the vision tokens at {read.where} ({float16})"
            _note_non_finite(bad_images, outputs[name], reason)
            columns[name] = outputs[name].numpy()[owner_index]
    order = prepared["text_order"].tolist() if prepared["text_order"] is not None else []
    for name, read in plan.reads["text"].items():
        if not read.tokens:
            continue
        rows, finite, sorted_rows = [None] * len(order), [], []
        for state, mask in outputs[name]:
            real = state.masked_fill(~mask[..., None], 0)  # padding positions are never stored
            finite.append(torch.isfinite(real).flatten(1).all(1))
            sorted_rows += [row[m].numpy() for row, m in zip(state, mask)]
        finite = torch.cat(finite)
        for sorted_row, caption in enumerate(order):
            rows[caption] = sorted_rows[sorted_row]
            if not finite[sorted_row]:
                bad_captions.setdefault(caption, f"NaN or Inf in the text tokens at {read.where} ({float16})")
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


def _autocast(model):
    device = next(model.vision_model.parameters()).device
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
