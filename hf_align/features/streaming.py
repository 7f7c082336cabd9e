"""Streaming extraction: `extract_features` over a `datasets.IterableDataset` (`load_dataset(..., streaming=True)`),
source shard by source shard, into a sharded feature cache (layout: `hf_align.features.store`).

Each source shard (`dataset.shard(num_shards=dataset.num_shards, index=i)`) is read once, a batch at a time, and
encoded into `data/shard-<i>.arrow`: written under a temporary name, fsynced, renamed, and only then recorded as done
(a small JSON record of its rows, size, SHA-256 and skipped samples, itself written atomically and fsynced). Memory
holds a few batches, whatever the length of the stream. The cache is built in `<target>.partial`, a name derived from
the target alone, so a rerun of the same call after a crash or a kill finds it: the finished shards (their checksums
verified) are kept and only the others are encoded again. When every shard is done, the metadata is written last,
fsynced, and the folder renamed to the target. One extraction at a time writes a partial folder (it holds a lock
file in it; POSIX only); a second one of the same cache waits for it, then reads the finished cache.

Rows: `image_id` = source shard * 2**32 + row within the source shard; a bad sample is named and recorded by its
source shard and row. Preprocessing runs in `num_workers` DataLoader workers, each reading whole source shards (so a
shard is read once); the encoders run in this process.

Scale-out: under `accelerate launch` / `torchrun` with several processes, process r encodes every world-th unfinished
source shard, starting at the r-th: on a fresh run, shards i ≡ r (mod world), which is what
`datasets.distributed.split_dataset_by_node(dataset, r, world, strategy="shards")` assigns
(`shard_data_sources(num_shards=world, index=r, contiguous=False)`). Whole shards are taken here rather than through
`split_dataset_by_node`, whose stream runs a process's shards together: a shard must end in its own file, named by
its global index, for a rerun to know what is done. The main process writes the metadata once every process is done.

The cache's fingerprint needs the stream's identity, which an `IterableDataset` does not carry (`fingerprint` is
map-style only): `stream_identity` derives it from the stream's sources (data files with their sizes and modification
times, or the fingerprints of the map-style shards of `Dataset.to_iterable_dataset`), the builder configuration, the
transforms applied to the stream (hashed as `datasets` hashes `map` functions) and its features. A stream whose rows
come from elsewhere (`IterableDataset.from_generator`) has none: it needs an explicit `cache_path`.

`stream_cache` reads a finished cache back as a stream (`hf_align.load_features(..., streaming=True)`), each Arrow file
checked as it is read: its size first, its SHA-256 as its bytes go by.

Kept columns (`keep_columns`) get their Arrow types from the stream's features; a stream that does not declare them
(a webdataset whose files `datasets` cannot type, or one after `map`) has them inferred from its first rows, as
`datasets` does (`check_stream`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil

import datasets
import pyarrow as pa
import torch
from datasets.arrow_writer import ArrowWriter
from transformers.utils import logging

from ..utils.distributed import on_every_process, on_main
from ..utils.file_integrity import file_record, fsync_path
from .decode import prepare_batch
from .encode import BadSampleError, collect, default_num_workers, launched_ahead
from .store import (
    META_FILE,
    SHARD_FOLDER,
    SHARD_PREFIX,
    SHARDED_LAYOUT,
    FeatureCacheError,
    cache_path_inside,
    checked_records,
    load_cache,
    metadata_differences,
    reuse_or_clear,
    shard_file,
    write_json_atomic,
    write_sharded_meta,
)

logger = logging.get_logger(__name__)

__all__ = ["PARTIAL_SUFFIX", "check_stream", "extract_stream", "stream_cache", "stream_identity"]

PARTIAL_SUFFIX = ".partial"  # <target>.partial: the resumable state of a streamed extraction
_PROGRESS = "progress"  # in the partial folder: parts.json, one record per finished shard, the lock file
# Attributes of datasets' examples iterables that are iteration state, not what the stream yields.
_RUNTIME_STATE = ("ex_iterable", "ex_iterables", "_state_dict", "decoding_pool", "_owned_loops_and_tasks")


class _Unidentifiable(Exception):
    """The stream's rows cannot be traced to sources that identify them."""


# ---------------------------------------------------------------------------------------------- the stream
def check_stream(dataset: datasets.IterableDataset, image_column: str, text_column: str, keep_columns):
    """The stream as extraction reads it; `ValueError` naming what does not fit.

    A stream that does not declare its features (e.g. after `map`) gets them from its first rows
    (`datasets`' own inference, as `concatenate_datasets` does); the kept columns' Arrow types come from there. Image
    columns are read undecoded and decoded row by row (`hf_align.features.decode._rgb_image`).
    """
    if dataset._distributed is not None:
        raise ValueError(
            "dataset is already split by node (datasets.distributed.split_dataset_by_node); give the whole stream: "
            "extract_features splits it across processes itself, by source shard"
        )
    if dataset.features is None:
        dataset = dataset._resolve_features()
    columns = list(dataset.features)
    for argument, column in (("image_column", image_column), ("text_column", text_column)):
        if column not in columns:
            raise ValueError(f"{argument}={column!r} is not a column of the dataset; columns: {columns}")
    for column in keep_columns:
        if column not in columns:
            raise ValueError(f"keep_columns names {column!r}, not a column of the dataset: {columns}")
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def stream_identity(dataset: datasets.IterableDataset) -> dict:
    """What the cache's fingerprint records of a stream: its name, builder, config, split and shard count, and
    `"stream"`: a digest of its sources, transforms and features, or `None` when its rows cannot be traced to
    sources (a generator's stream)."""
    info = dataset.info
    names = {
        "name": info.dataset_name,
        "builder": info.builder_name,
        "config": info.config_name,
        "split": None if dataset.split is None else str(dataset.split),
        "num_shards": dataset.num_shards,
    }
    try:
        sources = _describe(dataset._ex_iterable)
    except _Unidentifiable:
        return {**names, "stream": None}
    features = None if dataset.features is None else dataset.features.to_dict()
    described = json.dumps([sources, features, repr(dataset._formatting)], sort_keys=True, default=str)
    return {**names, "stream": hashlib.sha256(described.encode()).hexdigest()[:24]}


def _describe(node) -> dict:
    """A JSON description of one of datasets' examples iterables: transforms hashed, sources listed."""
    from datasets.builder import DatasetBuilder
    from datasets.fingerprint import Hasher

    children = [node.ex_iterable] if hasattr(node, "ex_iterable") else getattr(node, "ex_iterables", None)
    if children is not None:  # a transform (map, filter, shuffle, ...) of other iterables
        settings = {key: value for key, value in vars(node).items() if key not in _RUNTIME_STATE}
        try:
            digest = Hasher.hash(settings)
        except Exception as err:  # dill cannot pickle every object a transform may hold
            raise _Unidentifiable(type(node).__name__) from err
        return {"step": type(node).__name__, "settings": digest, "of": [_describe(child) for child in children]}
    kwargs = getattr(node, "kwargs", {})
    shards = [v for value in kwargs.values() if isinstance(value, list) for v in value]
    if shards and all(isinstance(shard, datasets.Dataset) for shard in shards):  # Dataset.to_iterable_dataset()
        return {"datasets": [shard._fingerprint for shard in shards]}
    generate = getattr(node, "generate_examples_fn", None) or getattr(node, "generate_tables_fn", None)
    builder = getattr(generate, "__self__", None)
    if isinstance(builder, DatasetBuilder) and getattr(builder.config, "data_files", None):
        files = []
        for key in sorted(kwargs):
            values = kwargs[key] if isinstance(kwargs[key], list) else [kwargs[key]]
            files += [_file_identity(value) for value in values if isinstance(value, str)]
        return {"builder": [type(builder).__name__, builder.config_id], "files": files}
    raise _Unidentifiable(type(node).__name__)


def _file_identity(path: str):
    """A local file as [path, size, mtime]: rewriting it makes another stream. A URL (Hub files carry their
    revision in it) as it is."""
    if os.path.isfile(path):
        return [path, os.path.getsize(path), os.stat(path).st_mtime_ns]
    return path


# ---------------------------------------------------------------------------------------------- extraction
def extract_stream(model, processor, dataset, plan, schema, parts, target, cache_path, num_workers, state):
    """Encode `dataset` (from `check_stream`) into the sharded cache `target`, or reuse it; returns the cache.

    `plan`, `schema`: the extraction's (`hf_align.features.encode.build_plan`); `parts`: its fingerprint's parts.
    """
    if on_main(state, lambda: reuse_or_clear(target, parts, cache_path)):
        logger.info(f"reusing feature cache {target}")
        return load_cache(target, parts, verify_checksum=False)  # verified by reuse_or_clear just now
    partial = target + PARTIAL_SUFFIX
    n_shards = dataset.num_shards
    lock: list = []  # the main process's lock file, held until the cache is finished
    try:
        done = on_main(state, lambda: _open_partial(partial, target, parts, cache_path, n_shards, lock))
        if done is None:  # finished by another extraction while this one waited for the lock
            return load_cache(target, parts)
        todo = [index for index in range(n_shards) if index not in done]
        mine = todo[state.process_index :: state.num_processes]  # see the module docstring

        def encode() -> tuple[int, list]:
            return _encode_shards(model, processor, dataset, plan, schema, partial, mine, num_workers, state)

        if todo:
            logger.info(f"extracting {len(todo)} of {n_shards} source shards into {partial}")
        encode() if state.num_processes == 1 else on_every_process(encode)
        on_main(state, lambda: _finish(partial, target, parts, n_shards))
    finally:
        for handle in lock:
            handle.close()
    return load_cache(target, parts)


def _open_partial(partial: str, target: str, parts: dict, cache_path, n_shards: int, lock: list) -> list[int] | None:
    """Lock the partial folder and find its finished shards (their files verified: size and SHA-256); `None` when
    the cache got finished meanwhile. Damaged or half-written shards are removed, to be redone."""
    progress = os.path.join(partial, _PROGRESS)
    os.makedirs(progress, exist_ok=True)
    lock.append(_locked(os.path.join(progress, "lock")))
    if load_cache(target, parts) is not None:
        shutil.rmtree(partial, ignore_errors=True)
        return None
    expected = json.loads(json.dumps(parts, default=str))
    if os.path.isfile(os.path.join(partial, META_FILE)):  # finished, then stopped before the rename
        try:
            if load_cache(partial, expected) is not None:
                shutil.rmtree(progress)  # made again for the lock just now; its file stays held until we return
                _rename(partial, target)
                return None
        except FeatureCacheError as err:
            if cache_path is not None:  # a finished extraction in what the user named is never deleted for them
                raise FeatureCacheError(
                    f"{partial!r} holds a finished extraction that cannot be used for this one ({err}); rerun with "
                    "the inputs it was made with, or delete it to start over"
                ) from err
            logger.warning(f"restarting {partial}: {err}")
        _clear(partial)
    parts_path = os.path.join(progress, "parts.json")
    recorded = _read_json(parts_path)
    if recorded is not None and recorded != expected:
        differences = "; ".join(metadata_differences("", recorded, expected))
        if cache_path is not None:  # what the user named is never deleted for them
            raise FeatureCacheError(
                f"{partial!r} holds an unfinished extraction of other inputs ({differences}); rerun with the inputs "
                "it was started with, or delete it to start over"
            )
        logger.warning(f"restarting {partial}: an unfinished extraction of other inputs ({differences})")
        _clear(partial)
        recorded = None
    if recorded is None:
        write_json_atomic(parts_path, expected)
    done = []
    for index in range(n_shards):
        record_path = os.path.join(progress, f"{SHARD_PREFIX}{index:05d}.json")
        record = _read_json(record_path)
        if record is None:
            continue
        problem = _shard_problem(partial, record)
        if problem is None:
            done.append(index)
            continue
        logger.warning(f"redoing source shard {index}: {problem}")
        os.remove(record_path)
    data = os.path.join(partial, SHARD_FOLDER)
    os.makedirs(data, exist_ok=True)
    for name in os.listdir(data):  # half-written shards of a stopped run
        if name.endswith(".tmp"):
            os.remove(os.path.join(data, name))
    if done:
        logger.warning(f"resuming {partial}: {len(done)} of {n_shards} source shards already done, verified")
    return done


def _shard_problem(partial: str, record: dict) -> str | None:
    """Why a recorded shard cannot be kept (its file missing, or not the one recorded), or `None`."""
    path = os.path.join(partial, record["file"])
    if not os.path.isfile(path):
        return f"{record['file']} is missing"
    found = file_record(path)
    if found["size"] != record["size"]:
        return f"{record['file']} is {found['size']} bytes, {record['size']} were written"
    if found["sha256"] != record["sha256"]:
        return f"{record['file']} has SHA-256 {found['sha256']}, {record['sha256']} was written"
    return None


def _encode_shards(model, processor, dataset, plan, schema, partial, shards, num_workers, state) -> tuple[int, list]:
    """Encode the source `shards` into `partial`; returns their number and records. Each DataLoader worker reads
    whole shards; the batches arrive interleaved and each goes to its shard's writer."""
    from transformers.utils.logging import tqdm

    if not shards:
        return 0, []
    device = next(model.vision_model.parameters()).device
    loader = torch.utils.data.DataLoader(
        _ShardBatches(dataset, shards, processor, plan),
        batch_size=None,  # an item is already a batch
        collate_fn=_as_prepared,
        num_workers=min(default_num_workers(model, num_workers), len(shards)),
        pin_memory=device.type == "cuda",
    )
    progress = tqdm(desc="hf_align: extracting features (streaming)", unit="img", disable=not state.is_main_process)
    writers: dict[int, _ShardWriter] = {}
    records = []
    try:
        for launched in launched_ahead(model, loader, plan):
            prepared = launched["prepared"]
            shard = prepared["shard"]
            if shard not in writers:
                writers[shard] = _ShardWriter(partial, shard, schema)
            writer = writers[shard]
            writer.rows += collect(launched, plan, writer.writer, writer.skipped)
            writer.source_rows += prepared["n_source"]
            progress.update(prepared["n_source"])
            if prepared["last"]:
                records.append(writers.pop(shard).finish())
    finally:
        progress.close()
        for writer in writers.values():
            writer.abandon()
    return len(records), records


def _as_prepared(item: dict) -> dict:
    """The DataLoader's collate function: an item is a prepared batch already."""
    return item


class _ShardBatches(torch.utils.data.IterableDataset):
    """Prepared batches (`prepare_batch` dicts, plus `"last"`: the shard's final batch) of the source `shards`;
    a DataLoader worker takes every num_workers-th shard, so each shard is read once, by one worker, in order. An
    empty shard still gives one (empty) batch, so that it gets its file."""

    def __init__(self, dataset: datasets.IterableDataset, shards: list[int], processor, plan):
        self.dataset, self.shards, self.processor, self.plan = dataset, shards, processor, plan

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        shards = self.shards if worker is None else self.shards[worker.id :: worker.num_workers]
        for index in shards:
            source = self.dataset.shard(num_shards=self.dataset.num_shards, index=index)  # that source shard alone
            start, previous = 0, None
            for batch in source.iter(batch_size=self.plan.batch_size):
                if previous is not None:
                    yield self._prepare(index, start, previous, last=False)
                    start += len(previous[self.plan.image_column])
                previous = batch
            if previous is None:
                previous = {c: [] for c in (self.plan.image_column, self.plan.text_column, *self.plan.keep_columns)}
            yield self._prepare(index, start, previous, last=True)

    def _prepare(self, shard: int, start: int, batch: dict, last: bool) -> dict:
        prepared = prepare_batch(self.processor, self.plan, start, batch, shard=shard)
        prepared["last"] = last
        return prepared


class _ShardWriter:
    """The Arrow file of one source shard, written under a temporary name until `finish` makes it count."""

    def __init__(self, partial: str, index: int, schema: datasets.Features):
        self.partial, self.index, self.file = partial, index, shard_file(index)
        self.path = os.path.join(partial, self.file)
        self.writer = ArrowWriter(path=f"{self.path}.tmp", features=schema)
        self.rows, self.source_rows, self.skipped = 0, 0, []

    def finish(self) -> dict:
        """Finalize, fsync and rename the file, then record the shard as done; returns its record."""
        try:
            self.writer.finalize()
        finally:
            self.writer.close()
        fsync_path(f"{self.path}.tmp")
        os.replace(f"{self.path}.tmp", self.path)
        fsync_path(os.path.dirname(self.path))
        record = {
            "file": self.file,
            "source_shard": self.index,
            "num_rows": self.rows,
            "num_source_rows": self.source_rows,
            **file_record(self.path),
            "skipped": self.skipped,
        }
        write_json_atomic(os.path.join(self.partial, _PROGRESS, f"{SHARD_PREFIX}{self.index:05d}.json"), record)
        return record

    def abandon(self) -> None:
        self.writer.close()
        if os.path.exists(f"{self.path}.tmp"):
            os.remove(f"{self.path}.tmp")


def _finish(partial: str, target: str, parts: dict, n_shards: int) -> None:
    """Write the metadata of the finished shards (last, fsynced) and rename the partial folder to the target."""
    progress = os.path.join(partial, _PROGRESS)
    records = [_read_json(os.path.join(progress, f"{SHARD_PREFIX}{index:05d}.json")) for index in range(n_shards)]
    missing = [index for index, record in enumerate(records) if record is None]
    if missing:  # every process reported its shards done: only a concurrent deletion gets here
        raise FeatureCacheError(f"{partial!r}: source shards {missing[:20]} are not recorded done; rerun to redo them")
    if sum(record["num_source_rows"] for record in records) == 0:
        raise ValueError("dataset is empty: the stream yielded no rows; extract_features needs at least one pair")
    if sum(record["num_rows"] for record in records) == 0:
        first = next(sample for record in records for sample in record["skipped"])
        raise BadSampleError(f"every sample of the dataset was bad and skipped; first: {first}")
    write_sharded_meta(partial, parts, records)
    shutil.rmtree(progress)  # its lock file stays held (open) until the extraction returns
    _rename(partial, target)


def _rename(partial: str, target: str) -> None:
    os.replace(partial, target)
    fsync_path(os.path.dirname(target))


def _clear(partial: str) -> None:
    """Empty a partial folder for a fresh start, keeping its (held) lock file."""
    for name in os.listdir(partial):
        path = os.path.join(partial, name)
        if name == _PROGRESS:
            continue
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    progress = os.path.join(partial, _PROGRESS)
    for name in os.listdir(progress):
        if name != "lock":
            os.remove(os.path.join(progress, name))


def _read_json(path: str):
    """The JSON in `path`, or `None` when it is missing or unreadable (a record is written atomically, so an
    unreadable one was damaged after the fact and its shard is redone)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _locked(path: str):
    """`path` opened and exclusively locked (waiting for another extraction holding it); POSIX only."""
    handle = open(path, "a+")  # held open until the extraction returns
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; one extraction of a cache at a time is then up to the user
        return handle
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    return handle


# ------------------------------------------------------------------------------------------- a cache read as a stream
def stream_cache(
    folder: str, meta: dict, split: str, url: str | None = None, storage_options: dict | None = None
) -> datasets.IterableDataset:
    """The rows of the cache whose metadata `meta` lies in `folder`, as a `datasets.IterableDataset` reading its Arrow
    files in row order: from `folder`, or from `url` + their path (e.g. `hf://datasets/<repo>@<commit>/`, opened
    with fsspec and `storage_options`). Each file is checked like a downloaded one: its size before it is read, its
    SHA-256 as it is read; a truncated, altered or unreadable file raises `FeatureCacheError` naming it, when it is
    reached. Its file names must lie inside the cache (`hf_align.utils.safe_loading.resolve_inside`)."""
    from datasets.iterable_dataset import ArrowExamplesIterable

    records = checked_records(folder, meta, meta.get("layout") == SHARDED_LAYOUT)
    files = []
    for record in records:
        path = cache_path_inside(folder, record["file"], "feature cache file")
        name = "/".join(os.path.relpath(path, os.path.abspath(folder)).split(os.sep))
        files.append([name, path if url is None else url + name, record["size"], record["sha256"]])
    options = storage_options or {}
    with _opened(files[0], options) as (reader, _):
        features = datasets.Features.from_arrow_schema(reader.schema)
    examples = ArrowExamplesIterable(_verified_tables, kwargs={"files": files, "storage_options": options})
    return datasets.IterableDataset(examples, info=datasets.DatasetInfo(features=features), split=datasets.Split(split))


def _verified_tables(files: list, storage_options: dict):
    """(key, table) of each record batch of `files` ([name, url, size, sha256] each), every file checked whole."""
    for file in files:
        name, _, size, sha256 = file
        with _opened(file, storage_options) as (reader, hashed):
            for index, batch in enumerate(_batches(name, reader)):
                yield f"{name}:{index}", pa.Table.from_batches([batch])
            hashed.read()  # what follows the last batch (the end-of-stream marker) counts too
            if hashed.count != size or hashed.digest.hexdigest() != sha256:
                raise FeatureCacheError(
                    f"feature cache file {name} read {hashed.count} bytes with SHA-256 {hashed.digest.hexdigest()}, "
                    f"{size} bytes with {sha256} were written (modified after extraction); re-extract or re-push it"
                )


def _batches(name: str, reader):
    try:
        yield from reader
    except (pa.ArrowException, OSError) as err:
        raise FeatureCacheError(f"feature cache file {name} is not a readable Arrow file ({err})") from err


@contextlib.contextmanager
def _opened(file: list, storage_options: dict):
    """An Arrow stream reader of `file` ([name, url, size, sha256]) after its size is checked, and the hashing
    reader under it."""
    from fsspec.core import url_to_fs

    name, url, size, _ = file
    fs, path = url_to_fs(url, **(storage_options if "://" in url else {}))
    try:
        found = fs.size(path)
    except (OSError, ValueError):
        found = None
    if found != size:
        found = "is missing" if found is None else f"is {found} bytes"
        raise FeatureCacheError(
            f"feature cache file {name} {found}, {size} bytes were written (truncated or modified after extraction)"
        )
    with fs.open(path, "rb") as raw:
        hashed = _HashedReader(raw)
        try:
            reader = pa.ipc.open_stream(hashed)
        except (pa.ArrowException, OSError) as err:
            raise FeatureCacheError(f"feature cache file {name} is not a readable Arrow file ({err})") from err
        yield reader, hashed


class _HashedReader(io.RawIOBase):
    """A file read once, front to back, with the SHA-256 and the count of the bytes read so far."""

    def __init__(self, raw):
        self.raw, self.digest, self.count = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        self.digest.update(data)
        self.count += len(data)
        return len(data)
