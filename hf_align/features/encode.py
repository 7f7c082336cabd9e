"""Encoding batches for a feature cache: what an extraction reads from each encoder (`column_reads`, `ExtractionPlan`),
how a prepared batch goes through the encoders (`_launch`) and how its rows are checked and written (`collect`,
`encode_prepared`). Shared by `extract_features` over a map-style dataset (`hf_align.features.extract`) and over a
streamed one.

Bad samples (`on_bad_sample`): what cannot be encoded (an undecodable or empty image, a missing / empty / non-text /
non-UTF-8 caption, NaN or Inf in the encoder's output; see `hf_align.features.decode` for what is repaired instead)
raises `BadSampleError` naming its row by default; `on_bad_sample="skip"` leaves it out, logs it and records it in the
metadata (`skipped_samples`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from datasets.arrow_writer import ArrowWriter

from ..encoders.loading import blank_pixel_values, non_finite_rows, read_tap, text_fixed_length
from ..encoders.taps import Tap, default_pooling, default_source, tap_width
from ..model.configuration import resolve_layer_index
from ..model.templates import text_token_limit
from ..utils.cpu_threads import follow_load
from .decode import log_truncated
from .schema import features_schema, layer_column, source_column, tap_column
from .store import estimate_cache_bytes

__all__ = ["BAD_SAMPLE_POLICIES", "SHARD_IMAGE_ID_STRIDE", "BadSampleError"]


BAD_SAMPLE_POLICIES = ("raise", "skip")
# A streamed cache's image_id: source shard * stride + row within the shard (unique while a shard holds < 2**32 rows).
SHARD_IMAGE_ID_STRIDE = 2**32


class BadSampleError(ValueError):
    """A dataset sample `extract_features` cannot encode; the message names its row (and caption) and the problem."""


def requested_layers(modality: str, requested, config) -> list[int]:
    num = getattr(config, f"{modality}_num_layers")
    if requested is None:
        requested = "all" if getattr(config, f"{modality}_layer") == "auto" else [config.absolute_layer(modality)]
    if requested == "all":
        return list(range(num))
    if isinstance(requested, (int, str)) or not all(isinstance(v, int) for v in requested):
        raise ValueError(f"{modality}_layers must be None, 'all' or a list of ints, got {requested!r}")
    return sorted({resolve_layer_index(f"{modality}_layers", v, num) for v in requested})


@dataclass(frozen=True)
class ColumnRead:
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


def column_reads(model, modality: str, layers: list[int]) -> dict[str, ColumnRead]:
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
        layer_column(modality, layer): ColumnRead(
            Tap(layer, "hidden_states", hidden_pooling), hidden_prefix, info.hidden_sizes[layer], f"layer {layer}"
        )
        for layer in layers
    }
    if getattr(config, f"{modality}_layer") == "auto":
        # Layer selection first: the model reads nothing yet. It also weighs the encoder's own pooled embedding
        # (`pooler_output` of the families whose authors use it, e.g. EfficientNet): stored beside the layers.
        own = default_source(info, modality)
        if pooling != "tokens" and own == "pooler_output":
            reads[source_column(modality, own)] = ColumnRead(Tap(-1, own, "none"), 0, info.output_sizes[own], own)
        return reads
    tap = config.tap(modality)
    name = tap_column(config, modality)
    if name not in reads:
        absolute = config.absolute_layer(modality)
        if tap.source == "hidden_states":
            tap, where = Tap(absolute, "hidden_states", tap.pooling), f"layer {absolute}"
        else:
            where = tap.source
        reads[name] = ColumnRead(tap, prefix, tap_width(info, tap), where)
    return reads


@dataclass(frozen=True)
class ExtractionPlan:
    """What an extraction reads and stores; shared by the preprocessing workers and the encoding loop."""

    image_column: str
    text_column: str
    keep_columns: tuple[str, ...]
    reads: dict  # modality -> column name -> ColumnRead
    text_passes: dict  # fixed text length (None: as tokenized) -> the text columns read from that pass
    batch_size: int
    text_limit: int
    on_bad_sample: str


def build_plan(
    model,
    processor,
    reads,
    image_column,
    text_column,
    keep_features: datasets.Features,
    batch_size,
    max_text_length,
    on_bad_sample,
) -> tuple[ExtractionPlan, datasets.Features, int]:
    """The plan of an extraction, the Arrow schema of its rows and their estimated size in bytes per row (token
    columns counted at the vision encoder's token count and 32 text tokens)."""
    text_limit = text_token_limit(model, processor.tokenizer, max_text_length)
    pooled = {m: {name: r.width for name, r in reads[m].items() if not r.tokens} for m in reads}
    vision_tokens = {name: (_vision_token_count(model, r), r.width) for name, r in reads["vision"].items() if r.tokens}
    text_tokens = {name: r.width for name, r in reads["text"].items() if r.tokens}
    row_bytes = estimate_cache_bytes(
        1,
        list(pooled["vision"].values()),
        list(pooled["text"].values()),
        next(iter(vision_tokens.values()), None),
        (32, next(iter(text_tokens.values()))) if text_tokens else None,
    )
    schema = features_schema({**pooled["vision"], **pooled["text"]}, vision_tokens, text_tokens, keep_features)
    text_passes: dict[int | None, list[str]] = {}  # a SigLIP text tower's pooled taps need their own pass
    for name, read in reads["text"].items():
        text_passes.setdefault(text_fixed_length(model.text_model, read.tap), []).append(name)
    plan = ExtractionPlan(
        image_column, text_column, tuple(keep_features), reads, text_passes, batch_size, text_limit, on_bad_sample
    )
    return plan, schema, row_bytes


def default_num_workers(model, num_workers: int | None) -> int:
    if num_workers is not None:
        return num_workers
    # On a GPU the workers keep decoding off the device's critical path; on CPU they would take cores from the
    # encoders' forward pass (2 workers ran at 0.65x the speed of none on 2 cores: benchmarks/RESULTS.md).
    device = next(model.vision_model.parameters()).device
    return min(4, os.cpu_count() or 1) if device.type == "cuda" else 0


def encode_prepared(model, prepared_batches: Iterable[dict], plan: ExtractionPlan, path: str, schema, progress):
    """Encode prepared batches (`hf_align.features.decode.prepare_batch` dicts) into an Arrow file at `path`.

    Returns the number of rows written and the samples skipped. The device starts on batch i + 1 before batch i's
    outputs are waited for and written.
    """
    writer = ArrowWriter(path=path, features=schema)
    n_rows, skipped = 0, []
    try:
        for launched in launched_ahead(model, prepared_batches, plan):
            n_rows += collect(launched, plan, writer, skipped)
            progress.update(launched["prepared"]["n_source"])
        writer.finalize()
    finally:
        writer.close()
    return n_rows, skipped


def launched_ahead(model, prepared_batches: Iterable[dict], plan: ExtractionPlan):
    """`_launch` each prepared batch; yield batch i (for `collect`) once batch i + 1 is launched, so the device
    works on the next batch while this one's outputs are waited for and written."""
    device = next(model.vision_model.parameters()).device
    with channels_last_convnet(model.vision_model, device) as memory_format:
        pending = None
        for prepared in prepared_batches:
            follow_load()  # a neighbour that starts or stops mid-extraction changes torch's threads (cpu_threads)
            launched = _launch(model, prepared, plan, device, memory_format)
            if pending is not None:
                yield pending
            pending = launched
        if pending is not None:
            yield pending


# A tower with at least this many 2-d convolutions is a convnet (EfficientNet-Lite0 has 65; a ViT's patch embedding
# is one).
_CONVNET_MIN_CONVS = 8


@contextmanager
def channels_last_convnet(encoder: torch.nn.Module, device: torch.device) -> Iterator[torch.memory_format]:
    """On CPU, run a convolutional tower in channels-last memory format for the block, and give its weights back in
    the default format after it. Yields the memory format the pixel values should take.

    Why: oneDNN's depthwise and pointwise convolutions run faster on NHWC tensors than on PyTorch's default NCHW
    (EfficientNet-Lite0, all hidden states, batch 32: 1.4x with inference mode, features equal within 1e-6 of the
    largest value: `benchmarks/bench_convnet_cpu.py`). CUDA and non-convolutional towers are left as they are.
    """
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in encoder.modules())
    if device.type != "cpu" or convs < _CONVNET_MIN_CONVS:
        yield torch.contiguous_format
        return
    encoder.to(memory_format=torch.channels_last)
    try:
        yield torch.channels_last
    finally:
        encoder.to(memory_format=torch.contiguous_format)


def _vision_token_count(model, read: ColumnRead) -> int:
    """Tokens per image of a vision token column (one blank image through the encoder)."""
    outputs = model.vision_outputs(blank_pixel_values(model.vision_model))
    return read_tap(outputs, read.tap, read.num_prefix_tokens)[0].shape[1]


# ---------------------------------------------------------------------------------------------- one batch
@torch.inference_mode()
def _launch(
    model,
    prepared: dict,
    plan: ExtractionPlan,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict:
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
        pixel_values = prepared["pixel_values"].to(device, non_blocking=True)
        vision = model.vision_outputs(pixel_values.contiguous(memory_format=memory_format))
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


def collect(launched: dict, plan: ExtractionPlan, writer: ArrowWriter, skipped: list[dict]) -> int:
    """Wait for a launched batch, apply the bad-sample policy, write its rows; returns the number of rows written.

    Under `on_bad_sample="raise"` the first bad sample raises `BadSampleError` naming its row (and source shard, in a
    streamed extraction); under `"skip"` it is appended to `skipped`. Rows whose encoder output holds NaN/Inf are bad
    samples too and are never written.
    """
    prepared = launched["prepared"]
    start, shard = prepared["start"], prepared["shard"]

    def reject(position: int, reason: str, caption: int | None = None) -> None:
        where = ("" if shard is None else f"shard {shard}, ") + f"row {start + position}"
        where += "" if caption is None else f", caption {caption}"
        if plan.on_bad_sample == "raise":
            raise BadSampleError(f"{where}: {reason} (on_bad_sample='skip' leaves such samples out)")
        sample = {"row": start + position, "caption": caption, "reason": reason}
        skipped.append(sample if shard is None else {"shard": shard, **sample})

    for position, reason, caption in prepared["rejects"]:
        reject(position, reason, caption)
    if launched["outputs"] is None:
        return 0
    log_truncated(prepared["truncated"], plan.text_limit)
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
    first_id = start if shard is None else shard * SHARD_IMAGE_ID_STRIDE + start
    columns["image_id"] = np.asarray([first_id + positions[o] for o in owner], dtype=np.int64)
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
