"""The feature cache on disk: where a cache lives, how it is written so that a crash leaves nothing half-written, and
how it is checked before it is read.

A cache lives in `<cache_dir>/<fingerprint>/` (or the `cache_path` given to `extract_features`) and is written under
a temporary name (`<folder>.tmp-<host>-<pid>`), then renamed, so a crash never leaves a half-written cache behind; the
leftovers of a stopped extraction on this host are removed by the next one. The fingerprint covers the encoders (id,
revision or local files), what each stored column reads (its tap: source, layer, pooling, and the prefix tokens it
leaves out), the text encoder's sentence-transformers pipeline, the image processor and tokenizer settings, the
columns, the bad-sample policy and the source dataset's own fingerprint. `hf_align_cache.json` records those parts,
the row count, the Arrow file's size and SHA-256, and the samples left out: every load checks the size (and the
checksum when cheap, or on request), so a truncated or edited cache is refused instead of read.

A streamed extraction (`hf_align.features.streaming`) writes the sharded layout instead: one Arrow file per source
shard in `data/shard-<i>.arrow`, each recorded in `hf_align_cache.json` (`"layout": "sharded"`, `"shards"`: rows,
size and SHA-256 of each) and checked on load like the single file; `load_cache` returns the shards concatenated in
order, one memory-mapped Dataset.

`open_feature_cache` opens any folder a command is given: a finished cache, or a dataset saved with `save_to_disk`.

What a folder says is not trusted: every file its metadata (or a dataset folder's `state.json`, `dataset_dict.json`,
card `configs`) names must lie inside it after `realpath` (`hf_align.utils.safe_loading.resolve_inside`), and metadata
that is valid JSON but not what an extraction writes (a missing key, a wrong type) is damage, named by file and field.
Under
`cache_dir` (hf_align's own) damage is rebuilt; a `cache_path` the user named is never deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket

import datasets
from datasets.arrow_writer import ArrowWriter
from transformers.utils import logging

from ..utils.file_integrity import file_record, fsync_path
from ..utils.safe_loading import ArtefactError
from ..utils.safe_loading import resolve_inside as _resolve_inside
from ..version import __version__
from .decode import load_dataset_split

logger = logging.get_logger(__name__)

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CHECKSUM_AUTO_BYTES",
    "DATA_FILE",
    "META_FILE",
    "SHARDED_LAYOUT",
    "SHARD_FOLDER",
    "SHARD_PREFIX",
    "FeatureCacheError",
    "cache_folder_of",
    "default_cache_dir",
    "estimate_cache_bytes",
    "load_cache",
    "open_feature_cache",
    "read_cache_meta",
    "skipped_samples",
]


CACHE_FORMAT_VERSION = 2  # 2: the metadata records the data file's size and SHA-256, and the skipped samples
META_FILE = "hf_align_cache.json"
DATA_FILE = "features.arrow"
CHECKSUM_AUTO_BYTES = 256 * 2**20  # load_cache verifies the SHA-256 by default up to this size (about a second)
# per-process part of a map-style cache extracted by several processes (before concatenation); a sharded cache's files
SHARD_PREFIX = "shard-"
SHARD_FOLDER = "data"  # a sharded cache's Arrow files: data/shard-00000.arrow, one per source shard
SHARDED_LAYOUT = "sharded"


class FeatureCacheError(ValueError):
    """A cache folder that must not be read: built for other inputs, unfinished, truncated or modified on disk."""


def default_cache_dir() -> str:
    """Where feature caches live by default: `$HF_ALIGN_CACHE`, else `~/.cache/hf_align/features`."""
    return os.environ.get("HF_ALIGN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hf_align", "features"))


# ---------------------------------------------------------------------------------------------- fingerprint
def fingerprint(parts: dict) -> str:
    """The folder name of the cache of `parts` (every input the features depend on): a hash of their JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def local_signature(path: str | None) -> str | None:
    """A digest of the sizes and mtimes of a local encoder's weight and config files, subfolders included (a
    sentence-transformers folder keeps its pooling config and Dense weights in `1_Pooling/`, `2_Dense/`), so re-saving
    other weights or another pipeline there invalidates caches. `None` for a Hub id."""
    if not path or not os.path.isdir(path):
        return None
    digest = hashlib.sha256()
    for folder, subfolders, files in os.walk(path):
        subfolders.sort()
        for name in sorted(files):
            if name.endswith((".safetensors", ".bin", ".json")):
                full = os.path.join(folder, name)
                digest.update(
                    f"{os.path.relpath(full, path)}:{os.path.getsize(full)}:{os.path.getmtime(full)}\n".encode()
                )
    return digest.hexdigest()[:16]


def processor_signature(processor, max_text_length) -> dict:
    image_processor = processor.image_processor
    image = image_processor.to_dict()
    image.pop("processor_class", None)
    tokenizer = processor.tokenizer
    return {
        "image_processor": image,
        # to_dict() names the class, not the backend that runs it (torchvision or PIL resize differently)
        "image_backend": [type(image_processor).__name__, getattr(image_processor, "backend", None)],
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


# ---------------------------------------------------------------------------------------------- writing
def reuse_or_clear(target: str, parts: dict, cache_path) -> bool:
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


def new_partial_folder(target: str) -> str:
    # Host and pid in the name: a later run can tell a dead extraction's leftovers from a live one's.
    tmp = f"{target}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def finish_cache(tmp: str, target: str, parts: dict, n_rows: int, skipped: list[dict]) -> None:
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
        "data_file": file_record(os.path.join(tmp, DATA_FILE)),
        "skipped": skipped,
    }
    with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, default=str)
    try:
        os.replace(tmp, target)
    except OSError:
        # A concurrent writer finished first (a finished cache is a non-empty folder, which rename never replaces):
        # its cache of the same inputs stands, this one's copy goes.
        if not os.path.isdir(target):
            raise
        shutil.rmtree(tmp)


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


def shard_file(index: int) -> str:
    """Where source shard `index` lives in a sharded cache, relative to its folder."""
    return f"{SHARD_FOLDER}/{SHARD_PREFIX}{index:05d}.arrow"


def write_json_atomic(path: str, value) -> None:
    """Write `value` as JSON under a temporary name, fsync it, rename it to `path` and fsync the folder: a reader
    finds the old file, or the whole new one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(value, handle, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(path))


def write_sharded_meta(folder: str, parts: dict, shards: list[dict]) -> None:
    """Write the metadata of a sharded cache into `folder` (atomically, fsynced): `shards` are the per-shard
    records (`file`, `source_shard`, `num_rows`, `num_source_rows`, `size`, `sha256`, `skipped`), in shard order."""
    skipped = [sample for record in shards for sample in record["skipped"]]
    if skipped:
        where = [(sample["shard"], sample["row"]) for sample in skipped[:20]]
        logger.warning(
            f"on_bad_sample='skip': left out {len(skipped)} sample(s) at (shard, row) {where} (reasons recorded in "
            f"{META_FILE}); first: {skipped[0]['reason']}"
        )
    meta = {
        "fingerprint": fingerprint(parts),  # the folder name under cache_dir, for a copy that lives elsewhere
        "parts": parts,
        "layout": SHARDED_LAYOUT,
        "num_rows": sum(record["num_rows"] for record in shards),
        "complete": True,
        "shards": shards,
        "skipped": skipped,
        "hf_align_version": __version__,
    }
    write_json_atomic(os.path.join(folder, META_FILE), meta)


# ---------------------------------------------------------------------------------------------- reading
def cache_path_inside(folder, entry, what: str) -> str:
    """`hf_align.utils.safe_loading.resolve_inside`, the one check of every loader that a path read from an artefact
    (here a metadata field, or a data file a dataset folder lists) stays inside the artefact's folder after `realpath`
    (a Hub snapshot's files may link into that repo's blob store), raising `FeatureCacheError` like every cache
    loader; the message names `what`, the entry and the folder."""
    try:
        return _resolve_inside(folder, entry, what)
    except ArtefactError as err:
        raise FeatureCacheError(str(err)) from None


def load_cache(path: str, parts: dict | None = None, verify_checksum: bool | None = None) -> datasets.Dataset | None:
    """Open a finished cache folder; `None` if there is none (no `hf_align_cache.json`).

    Raises `FeatureCacheError` when `parts` (when given) differ from what the cache was built for (naming each
    differing part with both values), when the metadata does not hold what an extraction writes (naming the field),
    when a file it names lies outside the folder (`hf_align.utils.safe_loading.resolve_inside`), or when a data file is
    not the one written: its size is checked on every load, its SHA-256 when `verify_checksum=True`, or by default
    (`None`) when the data is at most `CHECKSUM_AUTO_BYTES`; an unreadable Arrow file is named.
    """
    meta = read_cache_meta(path)
    if meta is None:
        return None
    sharded = isinstance(meta, dict) and meta.get("layout") == SHARDED_LAYOUT
    records = checked_records(path, meta, sharded)
    if parts is not None:
        expected = json.loads(json.dumps(parts, default=str))
        differences = metadata_differences("", meta["parts"], expected)
        if differences:
            raise FeatureCacheError(
                f"feature cache {path!r} was built for other inputs: " + "; ".join(differences) + ". Use the "
                "inputs it was built for, or another cache folder"
            )
    files = [cache_path_inside(path, record["file"], "feature cache file") for record in records]
    total = sum(_checked_size(path, record["file"], file, record["size"]) for record, file in zip(records, files))
    if verify_checksum or (verify_checksum is None and total <= CHECKSUM_AUTO_BYTES):
        for record, file in zip(records, files):
            _check_sha256(path, record["file"], file, record["sha256"])
    pieces = []
    for record, file in zip(records, files):
        piece = _read_arrow(path, record["file"], file)
        if sharded and len(piece) != record["num_rows"]:
            raise FeatureCacheError(
                f"feature cache {path!r} is damaged: {record['file']} holds {len(piece)} rows, {record['num_rows']} "
                "were written; delete the folder to re-extract"
            )
        pieces.append(piece)
    dataset = datasets.concatenate_datasets(pieces) if sharded else pieces[0]
    if len(dataset) != meta["num_rows"]:
        raise FeatureCacheError(
            f"feature cache {path!r} is damaged: {len(dataset)} rows on disk, {meta['num_rows']} recorded"
        )
    return dataset


def checked_records(path: str, meta, sharded: bool) -> list[dict]:
    """The data file records of the metadata `meta` (`file`, `size`, `sha256`, and `num_rows` for a shard), after
    checking that it holds what an extraction writes; `FeatureCacheError` naming the file and field otherwise."""

    def damaged(field: str, expected: str, value) -> FeatureCacheError:
        return damaged_meta(path, field, expected, value)

    if not isinstance(meta, dict):
        raise damaged("(top level)", "an object", meta)
    checks = {"complete": (lambda v: v is True, "true"), "parts": (lambda v: isinstance(v, dict), "an object")}
    checks["num_rows"] = (_is_count, "an int >= 0")
    checks["skipped"] = (lambda v: isinstance(v, list), "a list")
    fields = {"size": (_is_count, "an int >= 0"), "sha256": (_is_sha256, "64 hexadecimal digits")}
    if sharded:
        shards = meta.get("shards")
        if not isinstance(shards, list) or not shards:
            raise FeatureCacheError(f"feature cache {path!r}: {META_FILE} lists no shards; re-extract it")
        records, names = shards, [f"shards[{i}]" for i in range(len(shards))]
        fields.update(file=(lambda v: isinstance(v, str), "a file path"), num_rows=(_is_count, "an int >= 0"))
    else:
        if not isinstance(meta.get("data_file"), dict):
            raise FeatureCacheError(
                f"feature cache {path!r} has no size/checksum record (written by an older hf_align); re-extract it"
            )
        records, names = [{**meta["data_file"], "file": DATA_FILE}], ["data_file"]
    for field, (valid, expected) in checks.items():
        if not valid(meta.get(field, [] if field == "skipped" else None)):
            raise damaged(field, expected, meta.get(field))
    for record, name in zip(records, names):
        if not isinstance(record, dict):
            raise damaged(name, "an object", record)
        for field, (valid, expected) in fields.items():
            if not valid(record.get(field)):
                raise damaged(f"{name}.{field}", expected, record.get(field))
    return records


def damaged_meta(path: str, field: str, expected: str, value) -> FeatureCacheError:
    """The error for the cache `path` whose metadata's `field` is not the `expected` kind of value."""
    return FeatureCacheError(
        f"feature cache {path!r} is damaged: {META_FILE} field {field!r} must be {expected}, got {_short(value, 80)}; "
        "delete the folder to re-extract"
    )


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _checked_size(path: str, name: str, full: str, written: int) -> int:
    """The size of the cache file `name` (at `full`); `FeatureCacheError` naming it when that is not `written`."""
    size = os.path.getsize(full) if os.path.isfile(full) else None
    if size != written:
        found = "is missing" if size is None else f"is {size} bytes"
        raise FeatureCacheError(
            f"feature cache {path!r} is damaged: {name} {found}, {written} bytes were written "
            "(truncated or modified after extraction); delete the folder to re-extract"
        )
    return size


def _check_sha256(path: str, name: str, full: str, written: str) -> None:
    digest = file_record(full)["sha256"]
    if digest != written:
        raise FeatureCacheError(
            f"feature cache {path!r} is damaged: {name} has SHA-256 {digest}, {written} was written (modified after "
            "extraction); delete the folder to re-extract"
        )


def _read_arrow(path: str, name: str, full: str) -> datasets.Dataset:
    """The Arrow file `name` of the cache `path`, memory-mapped. A large file's checksum is not verified by default,
    so a damaged header shows here: `FeatureCacheError` naming it, never a bare pyarrow error."""
    import pyarrow as pa

    try:
        return datasets.Dataset.from_file(full)
    except (pa.ArrowException, OSError) as err:
        raise FeatureCacheError(
            f"feature cache {path!r} is damaged: {name} is not a readable Arrow file ({err}); delete the folder to "
            "re-extract"
        ) from err


def open_feature_cache(path: str | os.PathLike, split: str = "train") -> datasets.Dataset:
    """Open a feature cache folder: a finished `extract_features` cache (`hf_align_cache.json`; checked as by
    `load_cache`), or a dataset saved with `save_to_disk` (a `DatasetDict` gives its `split`); any other local folder
    is read by `datasets.load_dataset` (its `split`), e.g. Parquet files of feature columns. Only the folder's own
    files are read (`hf_align.utils.safe_loading.resolve_inside`): the data files a `state.json`, a `dataset_dict.json`
    or the dataset card's `configs` list must lie in it.

    Raises:
        FileNotFoundError: `path` is not a folder.
        FeatureCacheError: an hf_align cache that must not be read (built unfinished, truncated or modified), or a
            folder that lists data files outside itself.
        ValueError: the folder holds neither an hf_align feature cache nor a dataset.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"feature cache folder {path!r} does not exist; give an extract_features cache or a save_to_disk folder"
        )
    cache = load_cache(path)
    if cache is not None:
        return cache
    try:
        _check_dataset_files(path)
        return load_dataset_split(path, split=split)
    except FileNotFoundError as err:  # datasets' "no data files here": say what the folder should have held
        raise ValueError(
            f"{path!r} holds neither an hf_align feature cache nor a save_to_disk dataset: {err}"
        ) from None


def _check_dataset_files(folder: str) -> None:
    """`FeatureCacheError` when a dataset folder lists a data file outside itself: `save_to_disk`'s `state.json`
    (`_data_files`) and `dataset_dict.json` (split folders), else the files `datasets` resolves from the folder's
    card (`configs` / `data_files`) or its default patterns."""
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        splits = _json_field(folder, "dataset_dict.json", "splits")
        for split in splits if isinstance(splits, list) else [splits]:
            _check_dataset_files(cache_path_inside(folder, split, "dataset_dict.json split folder"))
    elif os.path.isfile(os.path.join(folder, "state.json")):
        files = _json_field(folder, "state.json", "_data_files")
        for record in files if isinstance(files, list) else [files]:
            entry = record.get("filename") if isinstance(record, dict) else record
            cache_path_inside(folder, entry, "state.json data file")
    else:
        builder = datasets.load_dataset_builder(folder)
        for files in (builder.config.data_files or {}).values():
            for file in files:
                cache_path_inside(folder, os.path.relpath(file, folder), "data file of the dataset card's configs")


def _json_field(folder: str, name: str, field: str):
    """Field `field` of the JSON file `name` of a `save_to_disk` folder; `FeatureCacheError` naming what is wrong."""
    try:
        with open(cache_path_inside(folder, name, name), encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FeatureCacheError(f"{folder!r}: {name} is unreadable ({err})") from err
    if not isinstance(value, dict) or field not in value:
        raise FeatureCacheError(f"{folder!r}: {name} has no field {field!r}")
    return value[field]


def skipped_samples(features: datasets.Dataset) -> list[dict]:
    """The samples `extract_features(..., on_bad_sample="skip")` left out of this cache: `{"row", "caption",
    "reason"}` each (`caption` = index in the row's caption list, or `None` for the whole row); in a streamed
    (sharded) cache also `"shard"`, the source shard, within which `row` counts."""
    folder = cache_folder_of(features)
    if folder is None:
        raise ValueError("features is not an extract_features cache on disk (no hf_align_cache.json beside it)")
    return read_cache_meta(folder).get("skipped", [])


def read_cache_meta(folder: str) -> dict | None:
    """The metadata (`hf_align_cache.json`) of the cache in `folder`, `None` when it has none; `FeatureCacheError`
    when it cannot be read or is a link to a file outside the folder (`hf_align.utils.safe_loading.resolve_inside`)."""
    path = os.path.join(folder, META_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(cache_path_inside(folder, META_FILE, META_FILE), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FeatureCacheError(f"feature cache {folder!r}: {META_FILE} is unreadable ({err}); re-extract it") from err


def cache_folder_of(dataset: datasets.Dataset) -> str | None:
    """The cache folder a Dataset was read from: the one holding the metadata, beside its first Arrow file or, for a
    sharded cache, above `data/`; `None` for a Dataset that is not an hf_align cache on disk."""
    if not dataset.cache_files:
        return None
    first = os.path.dirname(os.path.abspath(dataset.cache_files[0]["filename"]))
    candidates = (first, os.path.dirname(first)) if os.path.basename(first) == SHARD_FOLDER else (first,)
    return next((f for f in candidates if os.path.isfile(os.path.join(f, META_FILE))), None)


def metadata_differences(prefix: str, recorded, expected) -> list[str]:
    """`part: recorded X, now Y` for each leaf where two JSON-like values differ (dicts are compared key by key)."""
    if isinstance(recorded, dict) and isinstance(expected, dict):
        out = []
        for key in sorted(set(recorded) | set(expected), key=str):
            if recorded.get(key) != expected.get(key):
                out += metadata_differences(
                    f"{prefix}.{key}" if prefix else str(key), recorded.get(key), expected.get(key)
                )
        return out
    return [f"{prefix or 'parts'}: recorded {_short(recorded)}, now {_short(expected)}"]


def _short(value, limit: int = 200) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)  # taps read `hidden_states[2] · mean`, not `\u00b7`
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- stale partial caches
def _remove_stale_partial_caches(target: str) -> None:
    """Delete `<target>.tmp-<host>-<pid>` folders of extractions on this host whose process is gone. A streamed
    extraction's `<target>.partial` never matches: it is the resumable state a rerun continues from."""
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
