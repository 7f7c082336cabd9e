"""Data-efficiency experiment (docs/methods.md §10): how held-out retrieval grows with the number of training images,
for plain and STRUCTURE-regularised aligners on the last and on the selected encoder layers, from ONE feature cache.

Protocol:

* `n_test` images (with all their captions) are held out once (`split_seed`); every run is scored on them with
  `hf_align.evaluate_retrieval`.
* **n counts images.** For each seed the remaining images are shuffled once and the first n of them, with all their
  captions, are the training set, so the subsets are nested (the 1k images of seed s are part of its 2.5k images).
  How the captions of an image are used is `training_args.caption_sampling` (by default one drawn afresh per epoch
  when an image has several). Sizes above the pool of images are dropped; `include_all` adds the whole pool.
* Each variant trains a fresh aligner with `hf_align.train` on the same subset, with the same fixed number of
  optimiser steps (`training_args.max_steps`), so the comparison is about data, not compute.
* `layers="last"` taps the deepest cached layer of each modality; `layers="selected"` sets both layers to `"auto"`,
  so `train` runs layer selection on the training images themselves (no peeking at the held-out images).
* Subsets are `select`ed views of the cache (memory-mapped, one file or many shards): the split reads `image_id`,
  and features are read for the training and held-out rows only.

`run_data_efficiency(...)` returns a `DataEfficiencyResult`; `save(output_dir)` writes `data_efficiency.json`
(every run), `data_efficiency.md` (mean ± std over seeds) and `data_efficiency.png`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
from transformers.utils import logging

from ..features import cached_layers, column_array, layer_column, split_by_image
from ..training.loop import AlignmentArguments, train

logger = logging.get_logger(__name__)

LAYER_CHOICES = ("last", "selected")
RESULT_FILES = ("data_efficiency.json", "data_efficiency.md", "data_efficiency.png")

__all__ = ["DataEfficiencyResult", "Variant", "default_variants", "run_data_efficiency"]


@dataclass
class Variant:
    """One curve: an aligner method with its keywords (incl. `structure_*`) trained on the `last` or `selected`
    layers."""

    name: str
    method: str = "linear"
    method_kwargs: dict = field(default_factory=dict)
    layers: str = "last"

    def __post_init__(self):
        if self.layers not in LAYER_CHOICES:
            raise ValueError(f"variant {self.name!r}: layers must be one of {LAYER_CHOICES}, got {self.layers!r}")


def default_variants(
    method: str = "linear", method_kwargs: dict | None = None, structure: dict | None = None
) -> list[Variant]:
    """method and method + STRUCTURE, each on the last and on the selected layers (4 curves).

    `structure`: the regulariser's settings without the `structure_` prefix (default `{"weight": 10.0}`).
    """
    method_kwargs = dict(method_kwargs or {})
    regularised = {**method_kwargs, **{f"structure_{k}": v for k, v in (structure or {"weight": 10.0}).items()}}
    variants = []
    for layers in LAYER_CHOICES:
        variants.append(Variant(f"{method} / {layers}", method, method_kwargs, layers))
        variants.append(Variant(f"{method}+STRUCTURE / {layers}", method, regularised, layers))
    return variants


@dataclass
class DataEfficiencyResult:
    """Every run (`runs`: variant, n = training images, n_rows = their caption rows, seed, layers, metrics, seconds)
    and the settings that produced them."""

    runs: list[dict]
    settings: dict
    metric: str = "mean_R@1"

    @property
    def variants(self) -> list[str]:
        return list(dict.fromkeys(run["variant"] for run in self.runs))

    @property
    def sizes(self) -> list[int]:
        return sorted({run["n"] for run in self.runs})

    def summary(self, metric: str | None = None) -> dict[str, dict[int, dict]]:
        """variant -> n -> {mean, std (over seeds, ddof=1; 0 for one seed), values, seeds}."""
        metric = metric or self.metric
        out: dict[str, dict[int, dict]] = {}
        for run in self.runs:
            cell = out.setdefault(run["variant"], {}).setdefault(run["n"], {"values": [], "seeds": []})
            cell["values"].append(run["metrics"][metric])
            cell["seeds"].append(run["seed"])
        for cells in out.values():
            for cell in cells.values():
                values = np.asarray(cell["values"], dtype=np.float64)
                cell["mean"] = float(values.mean())
                cell["std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        return out

    def to_markdown(self, metric: str | None = None) -> str:
        metric = metric or self.metric
        summary = self.summary(metric)
        settings = self.settings
        lines = [
            f"# Data efficiency: held-out {metric} (%), mean ± std over seeds {settings.get('seeds')}",
            "",
            f"n counts training images (each with all its captions, caption sampling "
            f"{settings.get('caption_sampling')!r}); {settings.get('n_test_images')} held-out images; "
            f"{settings.get('max_steps')} optimiser steps per run, batch ≤ {settings.get('batch_size')}, "
            f"lr {settings.get('learning_rate')}.",
            "",
            "| n images | " + " | ".join(self.variants) + " |",
            "|---:|" + "---:|" * len(self.variants),
        ]
        for n in self.sizes:
            cells = []
            for variant in self.variants:
                cell = summary[variant].get(n)
                cells.append("–" if cell is None else f"{cell['mean']:.1f} ± {cell['std']:.1f}")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        chosen = sorted(
            {(run["variant"], tuple(run["layers"])) for run in self.runs if run["layers_source"] == "selected"}
        )
        if chosen:
            lines += ["", "Layers chosen by selection (vision, text): " + "; ".join(f"{v}: {l}" for v, l in chosen)]
        return "\n".join(lines) + "\n"

    def plot(self, path: str, metric: str | None = None) -> str:
        from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's backend alone

        metric = metric or self.metric
        summary = self.summary(metric)
        figure = Figure(figsize=(6.4, 4.2), dpi=120)
        axes = figure.add_subplot()
        for variant in self.variants:
            sizes = sorted(summary[variant])
            means = [summary[variant][n]["mean"] for n in sizes]
            stds = [summary[variant][n]["std"] for n in sizes]
            axes.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, label=variant)
        axes.set_xscale("log")
        axes.set_xlabel("training images n")
        axes.set_ylabel(f"held-out {metric} (%)")
        axes.set_title(f"data efficiency (seeds {self.settings.get('seeds')})", fontsize="medium")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        figure.tight_layout()
        figure.savefig(path, format="png")
        return path

    def save(self, output_dir: str) -> list[str]:
        """Write the JSON record, the Markdown table and the plot; returns their paths."""
        os.makedirs(output_dir, exist_ok=True)
        json_path, md_path, png_path = (os.path.join(output_dir, name) for name in RESULT_FILES)
        summary = {v: {str(n): cell for n, cell in cells.items()} for v, cells in self.summary().items()}
        with open(json_path, "w", encoding="utf-8") as handle:
            json.dump(
                {"metric": self.metric, "settings": self.settings, "summary": summary, "runs": self.runs},
                handle,
                indent=2,
            )
        with open(md_path, "w", encoding="utf-8") as handle:
            handle.write(self.to_markdown())
        self.plot(png_path)
        return [json_path, md_path, png_path]

    @classmethod
    def load(cls, path: str) -> DataEfficiencyResult:
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
        return cls(runs=payload["runs"], settings=payload["settings"], metric=payload["metric"])


def _check_sizes(sizes: Sequence[int], pool: int, include_all: bool) -> list[int]:
    for n in sizes:
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 2:
            raise ValueError(f"sizes must be ints >= 2 (training images), got {n!r}")
    kept = sorted({int(n) for n in sizes if n <= pool})
    dropped = sorted({int(n) for n in sizes if n > pool})
    if dropped:
        logger.warning(f"data efficiency: sizes {dropped} exceed the {pool} training images the cache holds; dropped")
    if include_all and pool not in kept:
        kept.append(pool)
    if not kept:
        raise ValueError(
            f"no training size fits: sizes {list(sizes)} all exceed the {pool} images left after the test split"
        )
    return kept


def run_data_efficiency(
    features: datasets.Dataset,
    sizes: Sequence[int] = (1000, 2500, 5000, 10000, 25000, 50000),
    seeds: Sequence[int] = (0, 1, 2),
    variants: Sequence[Variant] | None = None,
    n_test: int = 1000,
    training_args: AlignmentArguments | None = None,
    include_all: bool = False,
    split_seed: int = 0,
    selection_kwargs: dict | None = None,
    metric: str = "mean_R@1",
    output_dir: str | None = None,
) -> DataEfficiencyResult:
    """Train every variant on n images for each n and seed, and score held-out retrieval.

    Args:
        features: one feature cache with pooled `vision_layer_{l}` / `text_layer_{l}` columns (all layers wanted for
            the `selected` variants) and optionally `image_id`.
        sizes: training-set sizes n, in images (each with all its captions); those above the images the cache holds
            after the test split are dropped.
        seeds: one run per seed (subset draw, initialisation and batch order).
        variants: curves to draw (default: `default_variants()` = linear and linear+STRUCTURE, last and selected).
            `selected` variants are skipped when the cache holds a single layer per modality (they would be `last`).
        n_test: held-out images.
        training_args: template of `AlignmentArguments` (`seed`, `output_dir`, `save_model` are set per run and the
            batch is capped at the rows of an epoch). Default: 500 steps, batch 1024, lr 1e-3, no validation split.
        include_all: also train on every image left after the test split.
        selection_kwargs: keywords for layer selection in the `selected` variants (metric, n_samples, k).
        metric: the retrieval number tabulated and plotted (every metric is kept in `runs`).
        output_dir: when given, the JSON / Markdown / PNG are written there.
    """
    if not isinstance(features, datasets.Dataset):
        raise TypeError(f"features must be a datasets.Dataset feature cache, got {type(features).__name__}")
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed")
    layers = {m: cached_layers(features, m) for m in ("vision", "text")}
    for modality, have in layers.items():
        if not have:
            raise ValueError(f"the feature cache holds no pooled {modality} layers ({modality}_layer_<l> columns)")
    widths = {m: len(features[0][layer_column(m, layers[m][-1])]) for m in layers}
    variants = list(variants) if variants is not None else default_variants()
    if len({v.name for v in variants}) != len(variants):
        raise ValueError(f"variant names must be unique, got {[v.name for v in variants]}")
    if all(len(have) == 1 for have in layers.values()) and any(v.layers == "selected" for v in variants):
        logger.warning(
            "data efficiency: the cache holds one layer per modality, so 'selected' = 'last'; skipping those"
        )
        variants = [v for v in variants if v.layers == "last"]
    template = training_args or AlignmentArguments(
        max_steps=500, per_device_train_batch_size=1024, learning_rate=1e-3, eval_fraction=0.0
    )
    pool, test_rows = split_by_image(features, n_test, split_seed, min_held_out=2, name="n_test")
    ids = column_array(features, "image_id")[pool] if "image_id" in features.column_names else np.arange(len(pool))
    images, owner = np.unique(ids, return_inverse=True)  # owner[r]: index into `images` of pool row r
    sizes = _check_sizes(sizes, len(images), include_all)
    test = features.select(test_rows.tolist())
    runs = []
    for seed in seeds:
        shuffle = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).numpy()
        rank = np.empty_like(shuffle)  # rank[k]: position of pool image k in this seed's shuffle
        rank[shuffle] = np.arange(len(images))
        for n in sizes:
            subset = features.select(pool[rank[owner] < n].tolist())  # the first n images, all their captions
            for variant in variants:
                runs.append(_one_run(variant, subset, test, n, seed, template, widths, layers, selection_kwargs))
                logger.info(f"data efficiency: {variant.name} n={n} seed={seed}: {runs[-1]['metrics'][metric]:.2f}")
    result = DataEfficiencyResult(
        runs=runs,
        metric=metric,
        settings={
            "seeds": list(seeds),
            "sizes": sizes,
            "n_test_images": n_test,
            "n_test_rows": len(test_rows),
            "pool_images": len(images),
            "pool_rows": len(pool),
            "caption_sampling": template.caption_sampling,
            "split_seed": split_seed,
            "max_steps": template.max_steps,
            "num_train_epochs": template.num_train_epochs if template.max_steps <= 0 else None,
            "batch_size": template.per_device_train_batch_size,
            "learning_rate": template.learning_rate,
            "variants": [dataclasses.asdict(v) for v in variants],
            "selection": dict(selection_kwargs or {}),
        },
    )
    if output_dir:
        result.save(output_dir)
    return result


def _one_run(variant, subset, test, n, seed, template, widths, layers, selection_kwargs) -> dict:
    from ..evaluation.zero_shot_retrieval import evaluate_retrieval
    from ..model.modeling import AlignerModel

    torch.manual_seed(seed)
    model = AlignerModel.from_feature_dims(
        widths["vision"], widths["text"], method=variant.method, **variant.method_kwargs
    )
    if variant.layers == "last":
        model.config.vision_layer, model.config.text_layer = layers["vision"][-1], layers["text"][-1]
    else:
        from ..training.layer_selection import resolve_auto_layers

        model.config.vision_layer = model.config.text_layer = "auto"
        resolve_auto_layers(model, subset, **{"seed": seed, **(selection_kwargs or {})})
    # An epoch visits n rows (one caption per image) unless every caption row is a pair: no batch is larger.
    epoch_rows = len(subset) if template.caption_sampling == "all" else n
    args = dataclasses.replace(
        template,
        seed=seed,
        output_dir=None,
        save_model=False,
        per_device_train_batch_size=min(template.per_device_train_batch_size, epoch_rows),
    )
    start = time.perf_counter()
    train(model, subset, args)
    seconds = time.perf_counter() - start
    metrics = evaluate_retrieval(model, None, test)
    return {
        "variant": variant.name,
        "n": n,
        "n_rows": len(subset),
        "seed": seed,
        "layers": [model.config.vision_layer, model.config.text_layer],
        "layers_source": variant.layers,
        "metrics": metrics,
        "train_seconds": round(seconds, 3),
    }
