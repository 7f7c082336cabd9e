"""The feature cache: frozen encoder outputs extracted once, stored as an Arrow-backed `datasets.Dataset` on disk.

* `schema`: the cache's columns (`layer_column`, `source_column`, `tap_column`, `cached_layers`, `column_array`),
  caches built from tensors (`features_from_tensors`), the model's view of a cache (`features_for`,
  `FeatureCollator`) and `split_by_image`.
* `store`: the folder on disk: fingerprint, atomic write, size and checksum checks (`load_cache`, `skipped_samples`,
  `FeatureCacheError`) and `open_feature_cache`, which opens any cache folder a command is given.
* `encode`: what an extraction reads from the encoders, one batch through them, its rows checked and written;
  `BadSampleError`.
* `streaming`: extraction of a `datasets.IterableDataset`, source shard by source shard, into a sharded cache that
  a killed run resumes (`PARTIAL_SUFFIX`, `SHARD_IMAGE_ID_STRIDE`); `stream_cache`, a finished cache read back as a
  stream, each file's size and SHA-256 checked as it is read.
* `extract`: `extract_features`, the encoders run once over a dataset (map-style or streamed).
* `decode`: the source side: loading a dataset split, decoding images and captions, preprocessing batches.
"""

from ..utils.distributed import cpu_process_group, process_state
from .decode import MAX_IMAGE_SIDE, load_dataset_split
from .encode import BAD_SAMPLE_POLICIES, SHARD_IMAGE_ID_STRIDE, BadSampleError
from .extract import extract_features
from .schema import (
    FeatureCollator,
    cached_layers,
    column_array,
    features_for,
    features_from_tensors,
    layer_column,
    source_column,
    split_by_image,
    stack_features,
    tap_column,
)
from .store import (
    CACHE_FORMAT_VERSION,
    CHECKSUM_AUTO_BYTES,
    DATA_FILE,
    META_FILE,
    SHARD_FOLDER,
    SHARD_PREFIX,
    SHARDED_LAYOUT,
    FeatureCacheError,
    cache_folder_of,
    default_cache_dir,
    estimate_cache_bytes,
    load_cache,
    open_feature_cache,
    read_cache_meta,
    skipped_samples,
)
from .streaming import PARTIAL_SUFFIX

__all__ = [
    "BAD_SAMPLE_POLICIES",
    "CACHE_FORMAT_VERSION",
    "CHECKSUM_AUTO_BYTES",
    "DATA_FILE",
    "MAX_IMAGE_SIDE",
    "META_FILE",
    "PARTIAL_SUFFIX",
    "SHARDED_LAYOUT",
    "SHARD_FOLDER",
    "SHARD_IMAGE_ID_STRIDE",
    "SHARD_PREFIX",
    "BadSampleError",
    "FeatureCacheError",
    "cache_folder_of",
    "FeatureCollator",
    "cached_layers",
    "column_array",
    "cpu_process_group",
    "default_cache_dir",
    "estimate_cache_bytes",
    "extract_features",
    "features_for",
    "features_from_tensors",
    "layer_column",
    "load_cache",
    "load_dataset_split",
    "open_feature_cache",
    "read_cache_meta",
    "process_state",
    "skipped_samples",
    "source_column",
    "split_by_image",
    "stack_features",
    "tap_column",
]
