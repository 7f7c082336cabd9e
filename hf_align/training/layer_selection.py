"""Cross-modal layer selection (docs/methods.md §4): score every (vision layer, text layer) pair of an all-layers
feature cache by representational similarity on a sample of pairs, and train on the best pair.

`select_layers(features)` reads the cache's pooled columns `vision_layer_{l}` / `text_layer_{l}` (`hf_align.features`)
and, as further candidates, the encoder's own pooled embedding where the cache holds it (`vision_pooler_output`,
`*_projected`: `SELECTABLE_SOURCES`; `extract_features` stores it beside the layers of an `"auto"` model), draws
`n_samples` pairs (one caption per image, so duplicated image rows cannot fake neighbourhood agreement), L2-normalises
every row (`normalize=True`, the STRUCTURE authors' `normalize: true`) and fills a
(n_vision_layers, n_text_layers) matrix with `mutual_knn` (default, k by the Rice rule), `cka` or `unbiased_cka`
(`hf_align.functional.representation_similarity`). Per-layer work (neighbour tables, centred statistics) is done once
per layer,
so the pair loop is cheap. Only `image_id` is read for every row (to draw the sample); the feature columns are read
for the sampled rows only, so a memory-mapped cache of any size or number of shards is never read whole.

`resolve_auto_layers(model, features)` is what `hf_align.train` calls when a layer is `"auto"`: it selects, points the
model at the best pair (`model.set_layers`, or the pooled embedding's source) and records the report, every candidate
included, in `model.config.training_summary`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from ..encoders.taps import POOLED_SOURCES
from ..features import cached_layers, layer_column, open_feature_cache  # open_feature_cache: re-exported, it lived here
from ..features.schema import cache_layer, source_column
from ..functional.representation_similarity import (
    cka_from_stats,
    knn_indices,
    linear_kernel_stats,
    mutual_knn_from_indices,
    resolve_k,
)

if TYPE_CHECKING:  # annotations only
    from ..model.modeling import AlignerModel

METRICS = ("mutual_knn", "cka", "unbiased_cka")
# The encoder's own pooled embeddings layer selection weighs against the hidden states when the cache holds them
# (`sentence_embedding` needs the sentence-transformers pipeline loaded with the encoder, so it is not among them).
SELECTABLE_SOURCES = ("pooler_output", "projected")

__all__ = [
    "METRICS",
    "SELECTABLE_SOURCES",
    "LayerSelectionReport",
    "open_feature_cache",
    "resolve_auto_layers",
    "select_layers",
]


@dataclass
class LayerSelectionReport:
    """Scores of every (vision layer, text layer) pair; `scores[i][j]` is for `vision_layers[i]`, `text_layers[j]`.

    Layers are absolute hidden-state indices, or the name of one of the encoder's own pooled embeddings
    (`"pooler_output"`, `"projected"`: `SELECTABLE_SOURCES`) when the cache holds it. `k` is the resolved neighbour
    count (mutual k-NN only) and `k_rule` what was asked for (`"rice"`, an int, ...). `vision_hidden_sizes` /
    `text_hidden_sizes` are the widths of those layers.
    `normalize`: whether rows were L2-normalised before scoring (reports saved before the option existed load as
    True for mutual k-NN, which always normalised, and False for CKA, which did not).
    """

    metric: str
    scores: list[list[float]]
    vision_layers: list[int | str]
    text_layers: list[int | str]
    vision_hidden_sizes: list[int]
    text_hidden_sizes: list[int]
    n_samples: int
    seed: int
    k: int | None = None
    k_rule: int | str | None = None
    extra: dict = field(default_factory=dict)
    normalize: bool = True

    @property
    def score_matrix(self) -> np.ndarray:
        return np.asarray(self.scores, dtype=np.float64)

    @property
    def best_index(self) -> tuple[int, int]:
        """Row and column of the best score (the first one in row-major order on ties)."""
        i, j = np.unravel_index(int(np.argmax(self.score_matrix)), self.score_matrix.shape)
        return int(i), int(j)

    @property
    def best_pair(self) -> tuple[int | str, int | str]:
        """(vision layer, text layer) with the highest score (a layer index or a pooled source's name)."""
        i, j = self.best_index
        return self.vision_layers[i], self.text_layers[j]

    @property
    def best_score(self) -> float:
        i, j = self.best_index
        return float(self.scores[i][j])

    @property
    def best_hidden_sizes(self) -> tuple[int, int]:
        i, j = self.best_index
        return self.vision_hidden_sizes[i], self.text_hidden_sizes[j]

    def summary(self) -> dict:
        """A JSON-able record (what `resolve_auto_layers` stores in `config.training_summary["layer_selection"]`)."""
        v, t = self.best_pair
        return {
            "metric": self.metric,
            "best_vision_layer": v,
            "best_text_layer": t,
            "best_score": self.best_score,
            "vision_layers": list(self.vision_layers),
            "text_layers": list(self.text_layers),
            "scores": [list(row) for row in self.scores],
            "n_samples": self.n_samples,
            "k": self.k,
            "seed": self.seed,
            "normalize": self.normalize,
        }

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str) -> None:
        """Write the report as JSON (every field, plus the best pair for readers of the file)."""
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        payload = {**self.to_dict(), "best_pair": list(self.best_pair), "best_score": self.best_score}
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)

    @classmethod
    def load(cls, path: str) -> LayerSelectionReport:
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
        payload.pop("best_pair", None)
        payload.pop("best_score", None)
        payload.setdefault("normalize", payload["metric"] == "mutual_knn")
        return cls(**payload)

    def plot(self, path: str, title: str | None = None) -> str:
        """Draw the score matrix as a heatmap PNG (vision layers on rows, text layers on columns); returns `path`."""
        from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's backend alone
        from matplotlib.patches import Rectangle

        matrix = self.score_matrix
        n_v, n_t = matrix.shape
        figure = Figure(figsize=(2.0 + 0.5 * max(n_t, 6), 1.5 + 0.4 * max(n_v, 6)), dpi=120)
        axes = figure.add_subplot()
        image = axes.imshow(matrix, cmap="viridis", origin="lower", aspect="auto")
        figure.colorbar(image, ax=axes, label=self.metric)
        axes.set_xticks(range(n_t), [str(layer) for layer in self.text_layers])
        axes.set_yticks(range(n_v), [str(layer) for layer in self.vision_layers])
        axes.set_xlabel("text layer")
        axes.set_ylabel("vision layer")
        if n_v * n_t <= 150:  # small enough to print every score in its cell
            middle = (matrix.max() + matrix.min()) / 2
            for i in range(n_v):
                for j in range(n_t):
                    color = "black" if matrix[i, j] > middle else "white"
                    axes.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize="x-small", color=color)
        i, j = self.best_index
        axes.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        k = f", k={self.k}" if self.k is not None else ""
        default_title = (
            f"cross-modal {self.metric} (n={self.n_samples}{k})\n"
            f"best: vision {self.best_pair[0]}, text {self.best_pair[1]} ({self.best_score:.3f})"
        )
        axes.set_title(title or default_title, fontsize="medium")
        figure.tight_layout()
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        figure.savefig(path, format="png")
        return path


def _candidate_layers(features: datasets.Dataset, modality: str, requested) -> list[int | str]:
    sources = [s for s in SELECTABLE_SOURCES if source_column(modality, s) in features.column_names]
    have = cached_layers(features, modality)
    if not have and not sources:
        raise ValueError(
            f"the feature cache holds no pooled {modality} layers (no {modality}_layer_<l> columns; "
            f"columns: {features.column_names}): extract it with {modality}_layers='all'"
        )
    if requested is None or requested == "all":
        return [*have, *sources]
    # an explicit list may name any pooled embedding the cache holds (a fixed side's `sentence_embedding`)
    sources = [s for s in POOLED_SOURCES if source_column(modality, s) in features.column_names]
    requested = [layer if layer in POOLED_SOURCES else int(layer) for layer in requested]
    missing = [layer for layer in requested if layer not in have and layer not in sources]
    if missing:
        raise ValueError(
            f"{modality}_layers={requested} asks for layers the feature cache does not hold: {missing}; "
            f"pooled {modality} layers cached: {have}, pooled embeddings: {sources}"
        )
    return requested


def _candidate_column(modality: str, candidate: int | str) -> str:
    return source_column(modality, candidate) if isinstance(candidate, str) else layer_column(modality, candidate)


def _sample_rows(features: datasets.Dataset, n_samples: int, seed: int) -> list[int]:
    """Up to `n_samples` random rows, at most one per image (the first of its captions in the random order)."""
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed)).numpy()
    if "image_id" in features.column_names:
        image_ids = features.with_format("numpy", columns=["image_id"])[:]["image_id"][order]
        _, first = np.unique(image_ids, return_index=True)  # position of each image's first row in `order`
        order = order[np.sort(first)]
    return sorted(order[:n_samples].tolist())


def _load_columns(features: datasets.Dataset, rows: list[int], columns: list[str], device) -> dict[str, torch.Tensor]:
    table = features.select(rows).with_format("torch", columns=columns)[:]
    out = {}
    for name in columns:
        values = table[name]
        if not isinstance(values, torch.Tensor) or values.dim() != 2:
            raise ValueError(f"cache column {name!r} must hold one fixed-width vector per row (pooled features)")
        out[name] = values.float().to(device)
    return out


def select_layers(
    features: datasets.Dataset,
    metric: str = "mutual_knn",
    n_samples: int = 5000,
    seed: int = 0,
    k: int | str = "rice",
    vision_layers: list[int] | str | None = None,
    text_layers: list[int] | str | None = None,
    device: str | torch.device | None = None,
    normalize: bool = True,
) -> LayerSelectionReport:
    """Score every (vision layer, text layer) pair of an all-layers feature cache by cross-modal similarity.

    Args:
        features: a feature cache (`datasets.Dataset` with pooled `vision_layer_{l}` / `text_layer_{l}` columns).
        metric: `mutual_knn` (the STRUCTURE authors' choice), `cka` or `unbiased_cka`.
        n_samples: pairs drawn at random (one caption per image); all of them when the cache holds fewer.
        seed: seed of that draw.
        k: neighbours for mutual k-NN: an int or a rule of the sample size (`rice` = ⌈2·n^⅓⌉, 35 for 5000).
        vision_layers: candidate vision layers (absolute indices, or `"pooler_output"` / `"projected"` for the
            encoder's own pooled embedding); default (or "all"): every cached layer and pooled embedding.
        text_layers: candidate text layers, likewise.
        device: where to compute (default: CUDA when available).
        normalize: L2-normalise every row before scoring, as the STRUCTURE authors do for every metric. CKA then
            ignores each sample's norm (without it, `cka(a, a * s)` for random per-row scales s is below 1); mutual
            k-NN compares cosines and gives the same scores either way.

    Returns a `LayerSelectionReport`; its `best_pair` is the layer pair to train on.
    """
    if not isinstance(features, datasets.Dataset):
        raise TypeError(f"features must be a datasets.Dataset feature cache, got {type(features).__name__}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 2:
        raise ValueError(f"n_samples must be an int >= 2, got {n_samples!r}")
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize must be True or False, got {normalize!r}")
    v_layers = _candidate_layers(features, "vision", vision_layers)
    t_layers = _candidate_layers(features, "text", text_layers)
    rows = _sample_rows(features, n_samples, seed)
    n = len(rows)
    k_value = resolve_k(k, n) if metric == "mutual_knn" else None
    if metric == "unbiased_cka" and n < 4:
        raise ValueError(f"unbiased_cka needs at least 4 samples, the cache gave {n}")
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    names = {("vision", l): _candidate_column("vision", l) for l in v_layers}
    names.update({("text", l): _candidate_column("text", l) for l in t_layers})
    data = _load_columns(features, rows, sorted(set(names.values())), device)
    if normalize:  # rows first, then the CKA statistics centre the columns: the authors' order
        data = {name: F.normalize(values, dim=1) for name, values in data.items()}

    # One summary per layer: neighbour tables for mutual k-NN, centred statistics for CKA.
    if metric == "mutual_knn":
        summaries = {key: knn_indices(data[name], k_value) for key, name in names.items()}

        def score(a, b):
            return mutual_knn_from_indices(a, b)
    else:
        summaries = {key: linear_kernel_stats(data[name], name) for key, name in names.items()}
        unbiased = metric == "unbiased_cka"

        def score(a, b):
            return cka_from_stats(a, b, unbiased=unbiased)

    scores = [[score(summaries["vision", v], summaries["text", t]) for t in t_layers] for v in v_layers]
    return LayerSelectionReport(
        metric=metric,
        scores=scores,
        vision_layers=v_layers,
        text_layers=t_layers,
        vision_hidden_sizes=[int(data[names["vision", l]].shape[1]) for l in v_layers],
        text_hidden_sizes=[int(data[names["text", l]].shape[1]) for l in t_layers],
        n_samples=n,
        seed=seed,
        k=k_value,
        k_rule=k if metric == "mutual_knn" else None,
        normalize=normalize,
    )


def resolve_auto_layers(model: AlignerModel, features: datasets.Dataset, **kwargs) -> LayerSelectionReport | None:
    """Choose the `"auto"` layer(s) of `model` by `select_layers` on `features` and point the model at them.

    A modality whose layer is fixed (an int) keeps it: only the other one is searched. The chosen layers and their
    widths (read from the cache) go to `model.set_layers`, which rebuilds the aligner if a width changed, and the
    report's summary is stored in `model.config.training_summary["layer_selection"]`. Returns the report, or `None`
    when neither layer is `"auto"` (nothing to do). `kwargs` go to `select_layers` (metric, n_samples, seed, k, ...).
    """
    config = model.config
    auto = {m: getattr(config, f"{m}_layer") == "auto" for m in ("vision", "text")}
    if not any(auto.values()):
        return None
    for modality in ("vision", "text"):
        if not auto[modality]:
            if kwargs.get(f"{modality}_layers") is not None:
                raise ValueError(
                    f"{modality}_layers candidates given but the model's {modality}_layer is fixed at "
                    f"{getattr(config, f'{modality}_layer')}"
                )
            # scored against what the fixed side reads: its layer, or its own pooled embedding
            source = getattr(config, f"{modality}_source")
            fixed = source if source in POOLED_SOURCES else cache_layer(config, features, modality, tokens=False)
            kwargs[f"{modality}_layers"] = [fixed]
    report = select_layers(features, **kwargs)
    chosen = dict(zip(("vision", "text"), zip(report.best_pair, report.best_hidden_sizes)))
    layers = {
        f"{m}_{key}": value
        for m, (layer, width) in chosen.items()
        if auto[m] and not isinstance(layer, str)
        for key, value in (("layer", layer), ("hidden_size", width))
    }
    if layers:
        model.set_layers(**layers)
    for modality, (layer, width) in chosen.items():
        if auto[modality] and isinstance(layer, str):
            _read_pooled_source(model, modality, layer, width)
    config.training_summary = {**config.training_summary, "layer_selection": report.summary()}
    return report


def _read_pooled_source(model, modality: str, source: str, width: int) -> None:
    """Point `model`'s `modality` side at the encoder's own pooled embedding `source` (after the last layer, no
    pooling), `width` wide: the last layer first through `set_layers` (which rebuilds the aligner for a new width),
    then the source."""
    config = model.config
    # an aligner without encoders knows no depth to count -1 from: any index serves set_layers' width check
    last = -1 if getattr(config, f"{modality}_num_layers") is not None else 0
    model.set_layers(**{f"{modality}_layer": last, f"{modality}_hidden_size": width})
    setattr(config, f"{modality}_layer", -1)
    setattr(config, f"{modality}_source", source)
    setattr(config, f"{modality}_pooling", "none")
    config.tap(modality)  # checks the three fields together
