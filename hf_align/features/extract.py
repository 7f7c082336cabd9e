"""`extract_features`: run the frozen encoders once over a dataset and write their features to a cache on disk.

Bad samples (`on_bad_sample`, `BadSampleError`): `hf_align.features.encode`.

Speed and scale-out: decoding, the image processor and the tokenizer run in `num_workers` DataLoader worker processes
while the encoders run (pinned memory and non-blocking copies on CUDA, bf16 autocast and SDPA attention there); the
device starts on batch i + 1 before batch i's outputs are copied back and written. Captions are sorted by token length
within a batch of images and encoded `batch_size` at a time, which cuts padding when images have several captions; the
rows are written in the source order. Under `accelerate launch` (or `torchrun`) with several processes, each process
encodes a contiguous run of the batches into a shard and the main process concatenates the shards in rank order, so
the cache holds the rows of a one-process run, in the same order. Memory does not grow with the dataset: batches
stream from the (memory-mapped) source to the Arrow file. A `datasets.IterableDataset` is extracted source shard by
source shard into a sharded cache instead, resumable after a kill: `hf_align.features.streaming`.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from typing import TYPE_CHECKING

import datasets
import torch
from transformers.utils import logging

from ..utils.cpu_threads import scoped_cpu_threads
from ..utils.distributed import broadcast, on_every_process, on_main, process_state
from .decode import Preprocessor, SourceBatches
from .encode import (
    BAD_SAMPLE_POLICIES,
    BadSampleError,
    build_plan,
    column_reads,
    default_num_workers,
    encode_prepared,
    requested_layers,
)
from .store import (
    CACHE_FORMAT_VERSION,
    DATA_FILE,
    SHARD_PREFIX,
    default_cache_dir,
    fingerprint,
    finish_cache,
    load_cache,
    local_signature,
    new_partial_folder,
    processor_signature,
    reuse_or_clear,
)
from .streaming import check_stream, extract_stream, stream_identity

if TYPE_CHECKING:  # annotations only
    from ..model.modeling import AlignerModel

logger = logging.get_logger(__name__)

__all__ = ["BAD_SAMPLE_POLICIES", "BadSampleError", "extract_features"]


@scoped_cpu_threads
def extract_features(
    model: AlignerModel,
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
            text column (a string, or a list of strings for several captions per image); or a
            `datasets.IterableDataset` (`load_dataset(..., streaming=True)`), extracted source shard by source shard
            into a sharded cache, resumable after a kill (`hf_align.features.streaming`; its `image_id` is source
            shard * 2**32 + row within the shard).
        vision_layers: hidden states to store pooled (for layer selection): `None` = the layer the
            model taps (the last one for taps after it; every layer when it is `"auto"`), `"all"`, or a list of
            hidden-state indices (negative allowed). They are pooled as the model's tap pools when it reads hidden
            states, else as `auto` pools them. What the model's tap reads is stored too (its token column for token
            methods, its own column for a source after the last layer: `hf_align.features.schema`). Everything
            comes from one forward pass per batch.
        text_layers: the same for the text encoder.
        keep_columns: source columns to copy into the cache (e.g. `["label"]`).
        batch_size: images per encoder forward pass; captions are sorted by length and encoded `batch_size` at a time.
        cache_dir: where caches live (default `$HF_ALIGN_CACHE` or `~/.cache/hf_align/features`).
        max_text_length: tokenizer truncation length (default: the smaller of the tokenizer's maximum and the text
            encoder's number of positions). Longer captions are truncated with a warning naming their rows.
        cache_path: the exact cache folder to use instead of `<cache_dir>/<fingerprint>` (e.g. a cache extracted
            earlier or copied from another machine). It is read when it holds a cache of exactly these inputs, and
            written when it does not exist; anything else raises `FeatureCacheError` naming what differs. Required
            for a stream whose identity cannot be derived (`IterableDataset.from_generator`): such a stream is then
            taken to be the one the folder was extracted from.
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
    streamed = isinstance(dataset, datasets.IterableDataset)
    _check_extraction_inputs(model, processor, dataset, image_column, text_column, keep_columns, batch_size)
    if streamed:
        stream = check_stream(dataset, image_column, text_column, keep_columns)
    if on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}")
    if num_workers is not None and (
        not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0
    ):
        raise ValueError(f"num_workers must be None or an int >= 0, got {num_workers!r}")
    config = model.config
    layers = {
        m: requested_layers(m, requested, config) for m, requested in (("vision", vision_layers), ("text", text_layers))
    }
    reads = {m: column_reads(model, m, layers[m]) for m in layers}
    pipeline = getattr(model.text_model, "pipeline", None)  # a sentence-transformers pipeline (through LoRA too)
    parts = {
        "format": CACHE_FORMAT_VERSION,
        "vision_encoder": [config.vision_encoder, config.vision_revision, local_signature(config.vision_encoder)],
        "text_encoder": [config.text_encoder, config.text_revision, local_signature(config.text_encoder)],
        "layers": layers,
        # Every stored column with the tap it reads (source, layer, pooling) and the prefix tokens it leaves out:
        # a cache extracted through one tap is never reused for another.
        "taps": {m: {name: read.signature() for name, read in reads[m].items()} for m in reads},
        "text_pipeline": pipeline.describe() if hasattr(pipeline, "describe") else None,
        "processor": processor_signature(processor, max_text_length),
        "columns": [image_column, text_column, sorted(keep_columns)],
        "dataset": stream_identity(dataset) if streamed else dataset._fingerprint,
        "on_bad_sample": on_bad_sample,
    }
    if streamed and parts["dataset"]["stream"] is None and cache_path is None:
        raise ValueError(
            "cache_path is required for this IterableDataset: its rows do not come from data files or map-style "
            "datasets (e.g. IterableDataset.from_generator), so no cache fingerprint can be derived from it; give "
            "cache_path=<folder> to name its cache (a rerun with that folder reuses or resumes it)"
        )
    folder = cache_path or os.path.join(cache_dir or default_cache_dir(), fingerprint(parts))
    target = os.path.abspath(os.fspath(folder))
    state = process_state()
    if state.num_processes > 1:
        # The main process's inputs name the cache for all (an in-memory dataset's fingerprint can differ between
        # processes), and each process encodes on its own device.
        parts, target = broadcast([parts, target])
        if next(model.vision_model.parameters()).device != state.device:
            model.to(state.device)
    if streamed:
        keep_features = datasets.Features({c: stream.features[c] for c in keep_columns})
        plan, schema, _ = build_plan(
            model,
            processor,
            reads,
            image_column,
            text_column,
            keep_features,
            batch_size,
            max_text_length,
            on_bad_sample,
        )
        return extract_stream(model, processor, stream, plan, schema, parts, target, cache_path, num_workers, state)
    if on_main(state, lambda: reuse_or_clear(target, parts, cache_path)):
        logger.info(f"reusing feature cache {target}")
        return load_cache(target, parts, verify_checksum=False)  # verified by reuse_or_clear just now
    tmp = on_main(state, lambda: new_partial_folder(target))
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
        on_main(state, lambda: finish_cache(tmp, target, parts, n_rows, skipped))
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
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(dataset, datasets.IterableDataset):
        return  # its columns are checked by check_stream, its emptiness once read
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"dataset must be a datasets.Dataset, got {type(dataset).__name__} (or a datasets.IterableDataset: "
            "load_dataset(..., streaming=True))"
        )
    if len(dataset) == 0:
        raise ValueError("dataset is empty: extract_features needs at least one image–caption pair")
    for argument, column in (("image_column", image_column), ("text_column", text_column)):
        if column not in dataset.column_names:
            raise ValueError(f"{argument}={column!r} is not a column of the dataset; columns: {dataset.column_names}")
    for column in keep_columns:
        if column not in dataset.column_names:
            raise ValueError(f"keep_columns names {column!r}, not a column of the dataset: {dataset.column_names}")


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
    batches into `folder/shard-<r>.arrow`, which `finish_cache` concatenates in rank order: the batches are those of
    a one-process run, so are the rows, their order and their values.
    """
    from transformers.utils.logging import tqdm

    if isinstance(dataset.features.get(image_column), datasets.Image):
        # Decode each image ourselves (`_rgb_image`): datasets would decode a whole batch at once, so one corrupt
        # file would fail the batch without saying which row it was.
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    n_images = len(dataset)
    first_caption = dataset[0][text_column]
    captions_per_image = len(first_caption) if isinstance(first_caption, list) else 1
    keep_features = datasets.Features({c: dataset.features[c] for c in keep_columns})
    plan, schema, row_bytes = build_plan(
        model, processor, reads, image_column, text_column, keep_features, batch_size, max_text_length, on_bad_sample
    )
    estimate = n_images * captions_per_image * row_bytes
    logger.info(f"extracting features of {n_images} images: estimated cache size {estimate / 2**20:.1f} MiB")
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
        device = next(model.vision_model.parameters()).device
        loader = torch.utils.data.DataLoader(
            SourceBatches(dataset, plan.batch_size, batches),
            batch_size=None,  # an item is already a batch
            collate_fn=Preprocessor(processor, plan),
            # a single batch has nothing to overlap with
            num_workers=default_num_workers(model, num_workers) if len(batches) > 1 else 0,
            pin_memory=device.type == "cuda",
        )
        try:
            return encode_prepared(model, loader, plan, path, schema, progress)
        finally:
            progress.close()

    n_rows, skipped = encode() if world == 1 else on_every_process(encode)
    if n_rows == 0:
        raise BadSampleError(f"every sample of the dataset was bad and skipped; first: {skipped[0]}")
    return n_rows, skipped
