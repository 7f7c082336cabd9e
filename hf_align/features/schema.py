"""The feature cache's columns, and how a model and a training loop read them.

Layout of a cache (one row per image–caption pair; an image with several captions gives several rows):

* `vision_layer_{l}` / `text_layer_{l}`: pooled features of hidden state `l` (absolute index), float32 (d,).
* `vision_tokens_layer_{l}`: patch tokens (T, d) float16; `text_tokens_layer_{l}`: the caption's non-padding tokens
  (T_i, d) float16, variable length. Stored only for token poolings.
* `{modality}_{source}` (`vision_pooler_output`, `text_sentence_embedding`, `vision_last_hidden_state`, ...): what a
  model's tap reads after the last layer (`source_column`), float32 (d,); `{modality}_tokens_last_hidden_state`: the
  encoder's final tokens, as the token columns above.
* `image_id`: int64 id of the source image (the row of the source dataset); captions of one image share it.
* any `keep_columns` of the source dataset (e.g. `label`), repeated per caption.

`features_for` renames the columns a model taps to its `forward` arguments, `FeatureCollator` batches them, and
`split_by_image` splits the rows in two without an image on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch

from ..model.configuration import resolve_layer_index

if TYPE_CHECKING:  # annotations only
    from ..model.modeling import AlignerModel

__all__ = [
    "FeatureCollator",
    "cached_layers",
    "column_array",
    "features_for",
    "features_from_tensors",
    "layer_column",
    "source_column",
    "split_by_image",
    "stack_features",
    "tap_column",
]


def layer_column(modality: str, layer: int, tokens: bool = False) -> str:
    """Cache column of `modality` ("vision"/"text") at absolute hidden-state index `layer`."""
    return f"{modality}_tokens_layer_{layer}" if tokens else f"{modality}_layer_{layer}"


def source_column(modality: str, source: str, tokens: bool = False) -> str:
    """Cache column of what `modality`'s tap reads from `source`, one of the encoder's own outputs after its last
    layer (`last_hidden_state`, `pooler_output`, `projected`, `sentence_embedding`)."""
    return f"{modality}_tokens_{source}" if tokens else f"{modality}_{source}"


def tap_column(config, modality: str) -> str:
    """The cache column holding what the aligner of `config` reads from its `modality` encoder."""
    tap = config.tap(modality)
    if tap.source == "hidden_states":
        return layer_column(modality, config.absolute_layer(modality), not tap.pooled)
    return source_column(modality, tap.source, not tap.pooled)


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


# ---------------------------------------------------------------------------------------------- building a cache
def features_schema(
    pooled: dict[str, int],
    vision_tokens: dict[str, tuple[int, int]],
    text_tokens: dict[str, int],
    extra: datasets.Features | None = None,
) -> datasets.Features:
    """Column name -> width of the pooled columns, (T, width) of the vision token columns, width of the text ones
    (variable length)."""
    schema = {name: datasets.List(datasets.Value("float32"), length=dim) for name, dim in pooled.items()}
    for name, (length, dim) in vision_tokens.items():
        schema[name] = datasets.Array2D(shape=(length, dim), dtype="float16")
    for name, dim in text_tokens.items():
        schema[name] = datasets.Array2D(shape=(None, dim), dtype="float16")
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
        vision: layer -> (n, d) pooled features.
        text: layer -> (n, d) pooled features.
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
    pooled = {layer_column("vision", k): v.shape[-1] for k, v in vision.items()}
    pooled.update({layer_column("text", k): v.shape[-1] for k, v in text.items()})
    schema = features_schema(
        pooled,
        {layer_column("vision", k, tokens=True): tuple(v.shape[1:]) for k, v in vision_tokens.items()},
        {layer_column("text", k, tokens=True): v.shape[-1] for k, v in text_tokens.items()},
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
def features_for(model: AlignerModel, features: datasets.Dataset) -> datasets.Dataset:
    """The columns `model` trains on, renamed to its `forward` arguments: `vision_features`, `text_features`.

    Picks what `model.config` taps (`tap_column`: a hidden-state layer's pooled or token column, or the column of one
    of the encoder's own outputs) and keeps `image_id`. The result is what `transformers.Trainer` takes as
    `train_dataset` with `FeatureCollator`.
    """
    config = model.config
    columns = {}
    for modality in ("vision", "text"):
        if getattr(config, f"{modality}_source") != "hidden_states":
            name = tap_column(config, modality)
            if name not in features.column_names:
                raise ValueError(
                    f"the feature cache has no column {name!r}, which holds what this aligner reads from its "
                    f"{modality} encoder ({config.tap(modality).describe()}); re-extract it with this model "
                    f"(extract_features stores it); columns: {features.column_names}"
                )
            columns[name] = f"{modality}_features"
            continue
        tokens = getattr(config, f"resolved_{modality}_pooling") == "tokens"
        layer = cache_layer(config, features, modality, tokens)
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


def cache_layer(config, features: datasets.Dataset, modality: str, tokens: bool) -> int:
    layer = getattr(config, f"{modality}_layer")
    if getattr(config, f"{modality}_num_layers") is not None or (isinstance(layer, int) and layer >= 0):
        return config.absolute_layer(modality)
    # An aligner built from feature dims has no encoder to count layers: count them in the cache.
    have = cached_layers(features, modality, tokens)
    if not have:
        raise ValueError(f"the feature cache holds no {modality} layers (columns: {features.column_names})")
    if layer == "auto":
        raise ValueError(f"{modality}_layer is 'auto': run layer selection first (hf_align.select_layers)")
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


# ---------------------------------------------------------------------------------------------- splits
def split_by_image(
    features: datasets.Dataset,
    held_out: int | float,
    seed: int = 0,
    *,
    min_held_out: int = 1,
    min_kept: int = 1,
    name: str = "held_out",
) -> tuple[np.ndarray, np.ndarray]:
    """Split the rows of a feature cache in two by source image: all captions of an image fall on the same side.

    Rows are grouped by their `image_id` (without that column every row is its own image) and a random set of the
    images, drawn with `numpy.random.default_rng(seed)`, is held out with all their rows.

    Args:
        features: a feature cache or a `features_for` view.
        held_out: the images to hold out: an int is a count, a float in [0, 1) a share of the images (rounded to the
            nearest count).
        seed: seed of the draw; the same seed and images give the same split.
        min_held_out: the fewest images the held-out part may get; fewer raises `ValueError`.
        min_kept: the fewest images the kept part may get; fewer raises `ValueError`.
        name: the caller's name for `held_out` (e.g. `"eval_fraction"`), so that its errors name what was set.

    Returns:
        `(kept, held_out)`: the row indices of each part, int64 arrays (n_kept,) and (n_held_out,) in ascending order.
    """
    is_count = isinstance(held_out, (int, np.integer)) and not isinstance(held_out, bool) and held_out >= 0
    if not (is_count or (isinstance(held_out, float) and 0.0 <= held_out < 1.0)):
        raise ValueError(
            f"{name} must be an image count (int >= 0) or a share of the images (float in [0, 1)), got {held_out!r}"
        )
    ids = column_array(features, "image_id") if "image_id" in features.column_names else np.arange(len(features))
    images = np.unique(ids)
    count = int(held_out) if is_count else round(held_out * len(images))
    if count < min_held_out or len(images) - count < min_kept:
        raise ValueError(
            f"{name}={held_out!r} gives {count} held-out images of the {len(images)} in the cache; need at least "
            f"{min_held_out} held out and {min_kept} kept"
        )
    is_held_out = np.isin(ids, np.random.default_rng(seed).permutation(images)[:count])
    return np.flatnonzero(~is_held_out), np.flatnonzero(is_held_out)
