"""The before/after geometry report of `hf-align analyze`: modality gap, Wasserstein distances, alignment/uniformity
and matched-vs-random pair similarities of a feature cache, before and after alignment.

"Before" = the raw tapped (pooled) features of the two encoders, which only live in one space when both layers have
the same width (otherwise the report says "not applicable" and why); "after" = the aligned embeddings of an aligner,
scored with its own similarity head. `analyze` writes `analysis.json` and, with `plots=True`, the figures of
`hf_align.experiments.plots` for each stage.
"""

from __future__ import annotations

import json
import os

import datasets
import numpy as np
import torch

from ..evaluation.zero_shot_retrieval import embed_feature_cache
from ..features import cached_layers, layer_column
from ..functional.geometry import geometry_report, pair_similarities

__all__ = ["analyze"]


def analyze(
    features: datasets.Dataset,
    output_dir: str,
    model=None,
    vision_layer: int | None = None,
    text_layer: int | None = None,
    max_samples: int = 2000,
    seed: int = 0,
    plots: bool = True,
) -> dict:
    """The `hf-align analyze` report for a feature cache (and optionally a loaded aligner).

    Args:
        features: a feature cache with pooled `vision_layer_{l}` / `text_layer_{l}` columns.
        output_dir: where `analysis.json` and the plots are written.
        model: an `AlignerModel` for the "after" stage (none: "after" is not applicable).
        vision_layer / text_layer: cached layers for "before" (default: the aligner's layers, else the last; negative
            indices count from the last cached layer).
        max_samples: rows analysed (a random subset drawn with `seed`; exact OT is O(n^3)).
        plots: also draw `projection_<stage>.png` and `similarity_hist_<stage>.png` per applicable stage.

    Returns:
        The report written to `analysis.json`: row counts, seed, `stages` (`before`, `after`) and the plot paths.
    """
    os.makedirs(output_dir, exist_ok=True)
    rows = np.arange(len(features))
    if max_samples and len(rows) > max_samples:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), size=max_samples, replace=False))
    subset = features.select(rows)
    report: dict = {"n_rows": len(features), "n_rows_analysed": len(subset), "seed": seed, "stages": {}, "plots": []}

    # ---------------- before: raw tapped features
    if model is not None:
        vision_layer = model.config.vision_layer if vision_layer is None else vision_layer
        text_layer = model.config.text_layer if text_layer is None else text_layer
    v_layer, t_layer = _resolve(features, "vision", vision_layer), _resolve(features, "text", text_layer)
    raw_v = torch.as_tensor(np.asarray(subset[layer_column("vision", v_layer)], dtype=np.float32))
    raw_t = torch.as_tensor(np.asarray(subset[layer_column("text", t_layer)], dtype=np.float32))
    before = {"vision_layer": v_layer, "text_layer": t_layer, "vision_dim": raw_v.shape[1], "text_dim": raw_t.shape[1]}
    if raw_v.shape[1] == raw_t.shape[1]:
        before.update(applicable=True, similarity="cosine", **geometry_report(raw_v, raw_t, None, max_samples, seed))
        stages = {"before": (raw_v, raw_t, None, "cosine")}
    else:
        before.update(
            applicable=False,
            reason=f"the raw features have different widths (vision {raw_v.shape[1]}, text {raw_t.shape[1]}): they do "
            "not share a space, so gap and distances are undefined before alignment",
        )
        stages = {}
    report["stages"]["before"] = before

    # ---------------- after: aligned embeddings
    if model is not None:
        model.eval()
        images, texts = embed_feature_cache(model, subset)
        head = model.similarity
        score = head.score_pairs if getattr(head, "input_kind", "pooled") == "pooled" else None
        name = model.config.similarity
        after = {"method": model.config.method, "similarity": name, "applicable": True}
        after.update(geometry_report(images, texts, score, max_samples, seed))
        report["stages"]["after"] = after
        stages["after"] = (images, texts, score, name)
    else:
        report["stages"]["after"] = {"applicable": False, "reason": "no aligner given (--model)"}

    if plots:
        from .plots import plot_projection, plot_similarity_histogram

        for stage, (images, texts, score, name) in stages.items():
            matched, shuffled = pair_similarities(images, texts, score, seed)
            report["plots"].append(plot_projection(images, texts, stage, report["stages"][stage], output_dir))
            report["plots"].append(plot_similarity_histogram(matched, shuffled, stage, name, output_dir))
    with open(os.path.join(output_dir, "analysis.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    return report


def _resolve(features: datasets.Dataset, modality: str, layer: int | None) -> int:
    """The absolute index of a cached pooled `modality` layer (`None` = the last; negative counts from the last)."""
    have = cached_layers(features, modality)
    if not have:
        raise ValueError(f"the feature cache has no pooled {modality} features (columns: {features.column_names})")
    layer = -1 if layer is None else layer
    absolute = layer % (max(have) + 1) if layer < 0 else layer
    if absolute not in have:
        raise ValueError(f"{modality} layer {layer} is not in the cache; pooled {modality} layers cached: {have}")
    return absolute
