"""Sharing feature caches on the Hugging Face Hub: `push_features`, `load_features` and `check_features`.

A feature cache (what `extract_features` writes: `features.arrow`, or the sharded layout's `data/shard-*.arrow`, plus
`hf_align_cache.json`) goes to a Hub *dataset* repo as it is on disk, with a dataset card that says what it holds:
the encoders and their revisions, what each stored column reads (source, layer, pooling), the source dataset and its
licence, row counts and skipped samples, how it was made, and how to load it. The card's YAML `configs` point
`datasets.load_dataset(repo_id)` at the Arrow files.

`load_features(repo_id_or_path)` gives the cache back: a local folder is opened, a Hub repo downloaded
(`snapshot_download`) and opened, both checked as `hf_align.features.load_cache` checks a cache (sizes, checksums);
`streaming=True` returns a `datasets.IterableDataset` reading the repo's Arrow files in shard order without
downloading them (only the metadata file is). With a `model`, the cache is checked against its config before any
training (`check_features`): encoders and revisions, and for each column the model trains on, whether it is there,
what it was extracted through and its width. Every mismatch is named in one `FeatureCacheError`.
"""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING

import datasets

from ..encoders.taps import Tap
from . import (
    DATA_FILE,
    META_FILE,
    SHARD_FOLDER,
    SHARDED_LAYOUT,
    FeatureCacheError,
    cache_folder_of,
    cached_layers,
    layer_column,
    load_cache,
    open_feature_cache,
    read_cache_meta,
    source_column,
)
from .encode import ColumnRead
from .schema import cache_layer
from .store import damaged_meta
from .streaming import stream_cache

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, DatasetCard

    from ..model.configuration import AlignerConfig
    from ..model.modeling import AlignerModel

__all__ = ["check_features", "load_features", "push_features"]

MODALITIES = ("vision", "text")
CARD_TAGS = ("hf-align", "feature-extraction", "embeddings")
_SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"))
_SIZE_CATEGORIES += ((10**7, "1M<n<10M"), (10**8, "10M<n<100M"), (10**9, "100M<n<1B"), (10**10, "1B<n<10B"))
_MAX_LISTED_SKIPPED = 10
_RESIZE_FLAGS = {"size": "do_resize", "crop_size": "do_center_crop"}  # image processor setting -> the flag using it
# A tap's signature as the metadata records it: `hidden_states[3] · mean, 1 prefix token`, `pooler_output`.
_SIGNATURE = re.compile(r"^(?:hidden_states\[(?P<layer>\d+)\]|(?P<source>\w+))(?: · (?P<pooling>\w+))?")


# ---------------------------------------------------------------------------------------------- pushing
def push_features(
    cache: str | os.PathLike | datasets.Dataset,
    repo_id: str,
    *,
    token: bool | str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    source_dataset: str | None = None,
    source_license: str | None = None,
    commit_message: str | None = None,
) -> CommitInfo:
    """Push a finished feature cache to the Hub dataset repo `repo_id` (created if missing), with a dataset card.

    Args:
        cache: the cache folder (single-file `features.arrow` or sharded `data/shard-*.arrow`, with
            `hf_align_cache.json`), or the `datasets.Dataset` `extract_features` / `load_cache` returned for it.
        repo_id: the dataset repo, e.g. `"me/coco-dinov2-minilm-features"`.
        token: Hub token (default: the saved login).
        private: create the repo private (only when it does not exist yet).
        revision: branch to commit to (created from `main` if missing); default `main`.
        source_dataset: Hub id (or name) of the dataset the features were extracted from, for the card.
        source_license: its licence (a Hub licence id such as `cc-by-4.0`): the card's `license`, since the features
            derive from that data.
        commit_message: default `"Upload hf_align feature cache"`.

    Every data file and the metadata go up as they are on disk, after their sizes and SHA-256 are checked against
    the metadata; Arrow files of an earlier push that this cache does not have are deleted in the same commit.

    Returns:
        The `huggingface_hub.CommitInfo` of the commit (`.commit_url`).

    Raises:
        FileNotFoundError: `cache` is a path that does not exist.
        FeatureCacheError: `cache` is not a finished hf_align feature cache (no or unfinished metadata), or one
            damaged since it was written, or a view (`select`, `filter`, ...) of one rather than the whole cache.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    from ..version import __version__

    folder = _cache_folder(cache)
    meta = _read_meta(folder)
    _checked_parts(folder, meta)
    dataset = load_cache(folder, verify_checksum=True)
    if isinstance(cache, datasets.Dataset) and (
        len(cache) != len(dataset) or cache.column_names != dataset.column_names
    ):
        raise FeatureCacheError(
            f"cache is a view of the feature cache {folder!r} ({len(cache)} of its {len(dataset)} rows, columns "
            f"{cache.column_names}); push_features pushes whole caches: pass the folder"
        )
    files = _data_files(dataset, folder)
    card = _dataset_card(meta, dataset, files, repo_id, source_dataset, source_license)
    api = HfApi(library_name="hf_align", library_version=__version__)
    repo_id = api.create_repo(repo_id, repo_type="dataset", private=private, token=token, exist_ok=True).repo_id
    if revision is not None:
        api.create_branch(repo_id, branch=revision, repo_type="dataset", token=token, exist_ok=True)
    present = api.list_repo_files(repo_id, repo_type="dataset", revision=revision, token=token)
    stale = [path for path in present if _is_data_file(path) and path not in files]
    operations = [
        CommitOperationAdd(path_in_repo=path, path_or_fileobj=os.path.join(folder, *path.split("/")))
        for path in [*files, META_FILE]
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8")))
    operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
    return api.create_commit(
        repo_id,
        operations,
        repo_type="dataset",
        commit_message=commit_message or "Upload hf_align feature cache",
        token=token,
        revision=revision,
    )


def _cache_folder(cache) -> str:
    """The folder of a cache given as a path or as the Dataset read from it."""
    if isinstance(cache, datasets.Dataset):
        if not cache.cache_files:
            raise FeatureCacheError(
                "cache is an in-memory Dataset (no Arrow files on disk): push the folder extract_features wrote"
            )
        folder = cache_folder_of(cache)
        if folder is None:
            raise FeatureCacheError(
                f"cache is a Dataset read from {cache.cache_files[0]['filename']!r}, which is not in an hf_align "
                f"feature cache (no {META_FILE} beside it or above it)"
            )
        return folder
    folder = os.path.abspath(os.fspath(cache))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cache={os.fspath(cache)!r} is not a folder; give a feature cache folder")
    return folder


def _read_meta(folder: str) -> dict:
    """The metadata of a finished cache in `folder`; `FeatureCacheError` when there is none or it is unfinished."""
    meta = read_cache_meta(folder)
    if meta is None:
        raise FeatureCacheError(
            f"{folder!r} is not a finished hf_align feature cache: it has no {META_FILE} (an extraction writes it "
            f"last); give the folder extract_features wrote (files here: {sorted(os.listdir(folder))[:10]})"
        )
    if not isinstance(meta, dict) or meta.get("complete") is not True or not isinstance(meta.get("parts"), dict):
        raise FeatureCacheError(
            f"{folder!r} is not a finished hf_align feature cache: its {META_FILE} does not say complete=true with "
            "the extraction's parts; finish (or re-run) the extraction first"
        )
    return meta


def _checked_parts(folder: str, meta: dict) -> dict:
    """The metadata's parts, after checking the fields the model check and the dataset card read."""
    parts = meta["parts"]
    for field in ("vision_encoder", "text_encoder"):  # what the model check and the card read
        if not (isinstance(parts.get(field), list) and len(parts[field]) == 3 and isinstance(parts[field][0], str)):
            raise damaged_meta(folder, f"parts.{field}", "[encoder id, revision, local signature]", parts.get(field))
    taps = parts.get("taps", {})
    if not (
        isinstance(taps, dict) and all(isinstance(t, dict) and all(map(_is_str, t.values())) for t in taps.values())
    ):
        raise damaged_meta(folder, "parts.taps", "{modality: {column: tap}}", taps)
    return parts


def _is_str(value) -> bool:
    return isinstance(value, str)


def _data_files(dataset: datasets.Dataset, folder: str) -> list[str]:
    """Repo paths (POSIX, relative to `folder`) of the Arrow files behind the cache, in row order."""
    paths = []
    for record in dataset.cache_files:
        relative = os.path.relpath(os.path.abspath(record["filename"]), folder)
        if relative.startswith(os.pardir):
            raise FeatureCacheError(f"feature cache {folder!r} reads {record['filename']!r}, outside its folder")
        paths.append("/".join(relative.split(os.sep)))
    return paths


def _is_data_file(path: str) -> bool:
    return path == DATA_FILE or (path.startswith(f"{SHARD_FOLDER}/") and path.endswith(".arrow"))


# ---------------------------------------------------------------------------------------------- the dataset card
def _dataset_card(meta, dataset, files, repo_id, source_dataset, source_license) -> DatasetCard:
    from huggingface_hub import DatasetCard, DatasetCardData

    parts = meta["parts"]
    encoders = {m: parts[f"{m}_encoder"] for m in MODALITIES}
    pattern = f"{SHARD_FOLDER}/*.arrow" if meta.get("layout") == SHARDED_LAYOUT else files[0]
    data = DatasetCardData(
        license=source_license,
        pretty_name=f"hf_align features: {encoders['vision'][0]} + {encoders['text'][0]}",
        tags=list(CARD_TAGS),
        task_categories=["feature-extraction"],
        size_categories=[_size_category(len(dataset))],
        source_datasets=[source_dataset] if source_dataset else None,
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": pattern}]}],
    )
    body = "\n\n".join(
        [
            f"# {data.pretty_name}",
            "Frozen image and text encoder features extracted with `hf_align` (`pip install hf_align`): train "
            "post-hoc CLIP-style aligners on them without running the encoders.",
            _encoders_section(encoders),
            _columns_section(parts, dataset),
            _source_section(parts, source_dataset, source_license),
            _rows_section(meta, dataset, files),
            _provenance_section(meta),
            _usage_section(parts, repo_id),
        ]
    )
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def _size_category(n: int) -> str:
    return next((name for limit, name in _SIZE_CATEGORIES if n < limit), "n>10B")


def _encoders_section(encoders: dict) -> str:
    lines = ["## Encoders", "", "| modality | encoder | revision |", "|---|---|---|"]
    for modality, (name, revision, signature) in encoders.items():
        pinned = f"`{revision}`" if revision else f"local files (signature `{signature}`)" if signature else "–"
        lines.append(f"| {modality} | `{name}` | {pinned} |")
    return "\n".join(lines)


def _columns_section(parts: dict, dataset: datasets.Dataset) -> str:
    lines = [
        "## Stored columns",
        "",
        "One row per image–caption pair. Each feature column holds what one tap of an encoder reads (source, layer, "
        "pooling; mean and max leave the prefix tokens out).",
        "",
        "| column | modality | tap (source · pooling) | shape | dtype |",
        "|---|---|---|---|---|",
    ]
    for modality in MODALITIES:
        for column, signature in sorted(parts.get("taps", {}).get(modality, {}).items()):
            shape, dtype = _shape(dataset.features.get(column)) or (None, "–")
            sizes = ", ".join("T" if size is None else str(size) for size in shape or ())
            described = f"({sizes},)" if shape and len(shape) == 1 else f"({sizes})" if shape else "–"
            lines.append(f"| `{column}` | {modality} | `{signature}` | {described} | {dtype} |")
    other = [c for c in dataset.column_names if not any(c in parts.get("taps", {}).get(m, {}) for m in MODALITIES)]
    lines += ["", f"Other columns: {', '.join(f'`{c}`' for c in other)}; `image_id` names the source image of a row."]
    layers = parts.get("layers", {})
    lines.append(
        "Pooled hidden-state layers stored: "
        + "; ".join(f"{m} {layers.get(m, [])}" for m in MODALITIES)
        + " (absolute indices, 0 = embeddings)."
    )
    return "\n".join(lines)


def _shape(feature) -> tuple[tuple, str] | None:
    """(shape, dtype) of a feature column's rows: `(d,)` pooled, `(T, d)` tokens (`T` None when it varies); None for
    any other column."""
    if isinstance(feature, datasets.List):
        return (feature.length,), feature.feature.dtype
    if isinstance(feature, datasets.Array2D):
        return feature.shape, feature.dtype
    return None


def _source_section(parts: dict, source_dataset, source_license) -> str:
    image_column, text_column, kept = parts.get("columns") or (None, None, [])
    name = f"[`{source_dataset}`](https://huggingface.co/datasets/{source_dataset})" if source_dataset else "not given"
    licence = f"`{source_license}`" if source_license else "not given"
    return "\n".join(
        [
            "## Source data",
            "",
            f"- Source dataset: {name}; its licence: {licence}. The features derive from that data: its licence and "
            "terms apply to them.",
            f"- Read from its columns `{image_column}` (images) and `{text_column}` (captions)"
            + (f", kept: {', '.join(f'`{c}`' for c in kept)}" if kept else "")
            + f"; {_source_identity(parts.get('dataset'))}.",
        ]
    )


def _source_identity(identity) -> str:
    """What the metadata records of the source: a map-style dataset's fingerprint, or a stream's identity (a dict:
    name, config, split, number of source shards, ...)."""
    if isinstance(identity, dict):
        return "source stream: " + ", ".join(f"{k} `{v}`" for k, v in identity.items() if v is not None)
    return f"dataset fingerprint `{identity}`"


def _rows_section(meta: dict, dataset: datasets.Dataset, files: list[str]) -> str:
    skipped = meta.get("skipped", [])
    lines = [
        "## Rows",
        "",
        f"- {len(dataset)} rows in {len(files)} Arrow file{'s' if len(files) > 1 else ''} "
        + (
            f"(sharded: one per source shard, from {sum(s['num_source_rows'] for s in meta['shards'])} source rows)."
            if meta.get("layout") == SHARDED_LAYOUT
            else "(single file)."
        ),
        f"- {len(skipped)} sample{'s' if len(skipped) != 1 else ''} skipped as bad.",
    ]
    for sample in skipped[:_MAX_LISTED_SKIPPED]:
        where = ", ".join(f"{k} {sample[k]}" for k in ("shard", "row", "caption") if sample.get(k) is not None)
        lines.append(f"  - {where or 'whole row'}: {sample.get('reason')}")
    if len(skipped) > _MAX_LISTED_SKIPPED:
        lines.append(f"  - ... and {len(skipped) - _MAX_LISTED_SKIPPED} more (all in `{META_FILE}`)")
    return "\n".join(lines)


def _provenance_section(meta: dict) -> str:
    from ..version import __version__

    parts = meta["parts"]
    version = meta.get("hf_align_version")
    made = f"hf_align {version}" if version else f"hf_align (version not recorded), pushed with {__version__}"
    processor = parts.get("processor") or {}
    image = processor.get("image_processor") or {}
    resize = {k: image[k] for k, flag in _RESIZE_FLAGS.items() if image.get(k) is not None and image.get(flag)}
    normalise = f", mean {image.get('image_mean')}, std {image.get('image_std')}" if image.get("do_normalize") else ""
    tokenizer = processor.get("tokenizer") or [None, None, None, None]
    lines = [
        "## How it was made",
        "",
        f"- {made}, cache format {parts.get('format')}; bad samples: `{parts.get('on_bad_sample')}`.",
        f"- Image processor: `{image.get('image_processor_type')}`"
        + "".join(f", {k} {v}" for k, v in resize.items())
        + normalise
        + ".",
        f"- Tokenizer: `{tokenizer[0]}` of `{tokenizer[1]}` ({tokenizer[2]} tokens), max length "
        f"{tokenizer[3] if tokenizer[3] is not None else 'the encoder default'}.",
    ]
    if parts.get("text_pipeline"):
        lines.append(f"- Text sentence-transformers pipeline: `{json.dumps(parts['text_pipeline'])}`.")
    return "\n".join(lines)


def _usage_section(parts: dict, repo_id: str) -> str:
    arguments = [f'"{parts[f"{modality}_encoder"][0]}"' for modality in MODALITIES]
    for modality in MODALITIES:
        arguments += _model_arguments(modality, parts.get("taps", {}).get(modality, {}))
    model = "hf_align.AlignerModel.from_encoders(\n    " + ",\n    ".join(arguments) + ",\n)"
    return "\n".join(
        [
            "## Usage",
            "",
            "```python",
            "import hf_align",
            "",
            f'features = hf_align.load_features("{repo_id}")  # downloads it; sizes and checksums checked',
            f"model = {model}",
            f'features = hf_align.load_features("{repo_id}", model)  # also checks it against the model',
            'hf_align.train(model, features, hf_align.AlignmentArguments(output_dir="aligner"))',
            "```",
            "",
            f'`hf_align.load_features("{repo_id}", streaming=True)` streams the rows instead (a '
            f'`datasets.IterableDataset`); `datasets.load_dataset("{repo_id}")` reads the Arrow files too. With '
            'several layers stored, `vision_layer="auto"` / `text_layer="auto"` let `train` pick the best pair '
            "by layer selection.",
        ]
    )


def _model_arguments(modality: str, taps: dict[str, str]) -> list[str]:
    """`from_encoders` keywords that read `modality`'s stored column: its own output when one is stored, else its
    deepest pooled hidden-state layer."""
    read = {column: _SIGNATURE.match(signature) for column, signature in taps.items()}
    outputs = [m for c, m in read.items() if m and m["source"] and not c.startswith(f"{modality}_tokens_")]
    layers = [m for c, m in read.items() if m and m["layer"] and c == layer_column(modality, int(m["layer"]))]
    if outputs:
        chosen, arguments = outputs[0], [f'{modality}_source="{outputs[0]["source"]}"']
    elif layers:
        chosen = max(layers, key=lambda m: int(m["layer"]))
        arguments = [f"{modality}_layer={chosen['layer']}", f'{modality}_source="hidden_states"']
    else:
        return []
    return arguments + ([f'{modality}_pooling="{chosen["pooling"]}"'] if chosen["pooling"] else [])


# ---------------------------------------------------------------------------------------------- loading and checks
def load_features(
    repo_id_or_path: str | os.PathLike,
    model: AlignerModel | AlignerConfig | None = None,
    *,
    revision: str | None = None,
    token: bool | str | None = None,
    streaming: bool = False,
    split: str = "train",
) -> datasets.Dataset | datasets.IterableDataset:
    """Load a feature cache from a local folder or a Hub dataset repo (one `push_features` wrote).

    Args:
        repo_id_or_path: a local cache folder (any folder `hf_align.features.open_feature_cache` opens) or a Hub
            dataset id.
        model: an `AlignerModel` or its `AlignerConfig`: check the cache against it first (`check_features`).
        revision: Hub branch, tag or commit (default `main`).
        token: Hub token (default: the saved login).
        streaming: return a `datasets.IterableDataset` over the cache's Arrow files in row order, read as it is
            iterated (on the Hub only the metadata file is downloaded), instead of a memory-mapped `Dataset`.
        split: the split to open for a `save_to_disk` folder holding a `DatasetDict`; the IterableDataset's split.

    Returns:
        The cache: a `datasets.Dataset` (downloaded into the Hub cache and checked like `load_cache`: sizes always,
        SHA-256 when small), or with `streaming=True` a `datasets.IterableDataset`.

    Raises:
        FeatureCacheError: the cache is unfinished or damaged (a streamed file when it is reached: its size is checked
            before it is read, its SHA-256 as it is read), it names a file outside itself (its metadata, or a dataset
            folder's `state.json`, `dataset_dict.json` or card `configs`: only the folder's or the repo snapshot's own
            files are read), or it does not fit `model` (every mismatch named).
    """
    if not isinstance(streaming, bool):
        raise ValueError(f"streaming must be True or False, got {streaming!r}")
    location = os.fspath(repo_id_or_path)
    local = os.path.isdir(location)
    if not local and (os.path.exists(location) or location.startswith((".", "/", "~")) or location.count("/") > 1):
        raise FileNotFoundError(
            f"repo_id_or_path={location!r} is neither a local cache folder nor a Hub dataset id ('namespace/name')"
        )
    if streaming:
        return _stream(location, local, model, revision, token, split)
    if not local:
        from huggingface_hub import snapshot_download

        location = snapshot_download(location, repo_type="dataset", revision=revision, token=token)
    features = open_feature_cache(location, split=split)
    if model is not None:
        check_features(features, model)
    return features


def _stream(location, local, model, revision, token, split) -> datasets.IterableDataset:
    if local:
        folder, url, options = location, None, None
    else:
        from huggingface_hub import HfApi, hf_hub_download

        commit = HfApi().dataset_info(location, revision=revision, token=token).sha  # one commit for every file
        folder = os.path.dirname(
            hf_hub_download(location, META_FILE, repo_type="dataset", revision=commit, token=token)
        )
        url, options = f"hf://datasets/{location}@{commit}/", {"token": token}
    meta = _read_meta(folder)
    stream = stream_cache(folder, meta, split, url, options)
    if model is not None:
        _raise_mismatches(_mismatches(_checked_parts(folder, meta), stream, _config(model)), location)
    return stream


def check_features(features: datasets.Dataset | str | os.PathLike, model: AlignerModel | AlignerConfig) -> None:
    """Check that a feature cache holds what `model` trains on, before training; raise naming every mismatch.

    Compared with the model's config: the vision and text encoders (id, and revision when the model names an
    encoder; an aligner built with `from_feature_dims` names none), and for each modality the column the model reads
    (`hf_align.features.tap_column`): present, extracted through the same tap (source, layer, pooling, prefix tokens,
    as the cache metadata's `parts["taps"]` records it), as wide as the model's `<modality>_hidden_size`, and for a
    `sentence_embedding` tap with the same sentence-transformers pipeline. A layer set to `"auto"` needs pooled
    layers of that modality. A cache without hf_align metadata (e.g. `features_from_tensors`) is checked for its
    columns and widths only.

    Args:
        features: the cache (a `datasets.Dataset` read from it, not a `features_for` view) or its folder.
        model: an `AlignerModel` or its `AlignerConfig`.

    Raises:
        FeatureCacheError: one message listing each mismatch as `<part>: the cache recorded X, the model has Y`.
    """
    if not isinstance(features, datasets.Dataset):
        features = open_feature_cache(features)
    folder = cache_folder_of(features)
    parts = _checked_parts(folder, _read_meta(folder)) if folder is not None else None
    _raise_mismatches(_mismatches(parts, features, _config(model)), folder or "without hf_align metadata")


def _config(model):
    config = getattr(model, "config", model)
    if not hasattr(config, "tap") or not hasattr(config, "vision_encoder"):
        raise TypeError(f"model must be an AlignerModel or an AlignerConfig, got {type(model).__name__}")
    return config


def _raise_mismatches(problems: list[str], where: str) -> None:
    if problems:
        raise FeatureCacheError(
            f"the feature cache ({where}) does not fit the model: " + "; ".join(problems) + ". Extract features with "
            "this model (extract_features), or build the model for the cache (its dataset card says how)"
        )


def _mismatches(parts: dict | None, features, config) -> list[str]:
    """Every way the cache (`parts`: its metadata's parts or None; `features`: a Dataset or IterableDataset with
    known features) differs from what `config` trains on, in words."""
    problems = []
    columns = list(features.features or {})
    for modality in MODALITIES:
        name = getattr(config, f"{modality}_encoder")
        if parts is not None and name is not None:
            recorded, recorded_revision = parts[f"{modality}_encoder"][:2]
            revision = getattr(config, f"{modality}_revision")
            if recorded != name:
                problems.append(f"{modality} encoder: the cache recorded {recorded!r}, the model has {name!r}")
            elif recorded_revision != revision:
                problems.append(
                    f"{modality} encoder revision of {name!r}: the cache recorded {recorded_revision!r}, the model "
                    f"has {revision!r}"
                )
        if getattr(config, f"{modality}_layer") == "auto":
            if not cached_layers(features, modality):
                problems.append(
                    f"{modality} layer: the model's {modality}_layer is 'auto' (layer selection), the cache holds no "
                    f"pooled {modality} layers ({modality}_layer_<l> columns)"
                )
            continue
        try:
            column, read = _model_read(config, features, modality)
        except ValueError as err:
            problems.append(f"{modality} layer: {err}")
            continue
        if column not in columns:
            problems.append(
                f"{modality} column {column!r}: missing from the cache, the model reads {read.signature()} from it "
                f"(cache columns: {columns})"
            )
            continue
        recorded = (parts or {}).get("taps", {}).get(modality, {}).get(column)
        if parts is not None and recorded != read.signature():
            problems.append(
                f"{modality} tap of column {column!r}: the cache recorded {recorded}, the model reads "
                f"{read.signature()}"
            )
        shape = _shape(features.features[column])
        width, expected = shape[0][-1] if shape else None, getattr(config, f"{modality}_hidden_size")
        if expected is not None and width != expected:
            problems.append(
                f"{modality} width of column {column!r}: the cache stores {width}, the model has "
                f"{modality}_hidden_size={expected}"
            )
        if (
            parts is not None
            and read.tap.source == "sentence_embedding"
            and parts.get("text_pipeline") != (config.text_pipeline)
        ):
            problems.append(
                f"text sentence-transformers pipeline: the cache recorded {parts.get('text_pipeline')}, the model "
                f"has {config.text_pipeline}"
            )
    return problems


def _model_read(config, features, modality: str) -> tuple[str, ColumnRead]:
    """The cache column the aligner of `config` trains on for `modality` and what it reads, as an extraction by this
    model records it (the layer absolute; for an aligner without encoders, counted in the cache as `features_for`
    does)."""
    tap = config.tap(modality)
    prefix = config.num_prefix_tokens(modality)
    if tap.source != "hidden_states":
        return source_column(modality, tap.source, not tap.pooled), ColumnRead(tap, prefix, 0, tap.source)
    layer = cache_layer(config, features, modality, not tap.pooled)
    read = ColumnRead(Tap(layer, "hidden_states", tap.pooling), prefix, 0, f"layer {layer}")
    return layer_column(modality, layer, not tap.pooled), read
