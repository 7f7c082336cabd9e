"""`hf-align analyze`: modality gap, Wasserstein distances, alignment/uniformity and plots, before and after alignment.

Reads a feature cache. "Before" = the raw tapped (pooled) features of the two encoders, which only live in one space
when both layers have the same width (otherwise the report says "not applicable" and why); "after" = the aligned
embeddings of a saved aligner (`--model`), scored with its own similarity head. Writes `analysis.json` and, unless
`--plots false`, a 2-D PCA projection of both modalities and a histogram of matched vs random pair similarities per
stage.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from . import CommandSpec


@dataclass
class AnalyzeArguments:
    features: str = field(
        metadata={
            "help": "Feature cache folder (from extract_features or save_to_disk), or 'synthetic' for the synthetic task."
        }
    )
    output_dir: str = field(metadata={"help": "Where analysis.json and the plots are written."})
    model: str | None = field(default=None, metadata={"help": "Saved aligner folder for the 'after' stage (optional)."})
    vision_layer: int | None = field(
        default=None,
        metadata={"help": "Cached vision layer for 'before' (default: the aligner's layer, else the last)."},
    )
    text_layer: int | None = field(
        default=None, metadata={"help": "Cached text layer for 'before' (default: the aligner's layer, else the last)."}
    )
    max_samples: int = field(default=2000, metadata={"help": "Rows analysed (random subset; exact OT is O(n^3))."})
    seed: int = 0
    plots: bool = True


def load_feature_cache(path: str):
    """A feature cache from a folder: an `extract_features` cache, or a `Dataset.save_to_disk` folder; 'synthetic'
    builds the synthetic task's cache in memory."""
    import datasets

    from ..features import load_cache

    if path == "synthetic":
        from ..experiments.compare import synthetic_features

        return synthetic_features()
    if not os.path.isdir(path):
        raise ValueError(f"features={path!r} is not a folder (give a feature cache folder or 'synthetic')")
    cache = load_cache(path)
    if cache is not None:
        return cache
    try:
        return datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(
            f"{path!r} holds neither an hf_align feature cache nor a save_to_disk dataset: {err}"
        ) from None


def _resolve(features, modality: str, layer: int | None) -> int:
    from ..features import cached_layers

    have = cached_layers(features, modality)
    if not have:
        raise ValueError(f"the feature cache has no pooled {modality} features (columns: {features.column_names})")
    layer = -1 if layer is None else layer
    absolute = layer % (max(have) + 1) if layer < 0 else layer
    if absolute not in have:
        raise ValueError(f"{modality} layer {layer} is not in the cache; pooled {modality} layers cached: {have}")
    return absolute


def analyze(
    features,
    output_dir: str,
    model=None,
    vision_layer: int | None = None,
    text_layer: int | None = None,
    max_samples: int = 2000,
    seed: int = 0,
    plots: bool = True,
) -> dict:
    """The `hf-align analyze` report for a feature cache (and optionally a loaded aligner); also the API entry."""
    import numpy as np
    import torch

    from ..analysis import geometry_report, pair_similarities
    from ..features import layer_column

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
        from ..evaluation import embed_feature_cache

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
        for stage, (images, texts, score, name) in stages.items():
            matched, shuffled = pair_similarities(images, texts, score, seed)
            report["plots"].append(_plot_projection(images, texts, stage, report["stages"][stage], output_dir))
            report["plots"].append(_plot_histogram(matched, shuffled, stage, name, output_dir))
    with open(os.path.join(output_dir, "analysis.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    return report


def _plot_projection(images, texts, stage: str, stats: dict, output_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.asarray(images.detach().cpu().double() if hasattr(images, "detach") else images)
    y = np.asarray(texts.detach().cpu().double() if hasattr(texts, "detach") else texts)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    joint = np.concatenate([x, y])
    mean = joint.mean(0)
    _, _, vt = np.linalg.svd(joint - mean, full_matrices=False)  # joint PCA of both modalities
    px, py = (x - mean) @ vt[:2].T, (y - mean) @ vt[:2].T
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(px[:, 0], px[:, 1], s=4, alpha=0.5, label="image", color="tab:blue")
    ax.scatter(py[:, 0], py[:, 1], s=4, alpha=0.5, label="text", color="tab:orange")
    for points, color in ((px, "tab:blue"), (py, "tab:orange")):
        ax.scatter(*points.mean(0), s=150, marker="X", color=color, edgecolor="black")
    ax.set_title(
        f"{stage}: PCA of L2-normalised embeddings\ngap {stats['modality_gap']:.3f}, W2 {stats['sample_w2']:.3f}"
    )
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(markerscale=3)
    path = os.path.join(output_dir, f"projection_{stage}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_histogram(matched, shuffled, stage: str, similarity: str, output_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(5.5, 4))
    bins = np.histogram_bin_edges(np.concatenate([matched, shuffled]), bins=50)
    ax.hist(shuffled, bins=bins, alpha=0.6, density=True, label="random pairs", color="tab:gray")
    ax.hist(matched, bins=bins, alpha=0.6, density=True, label="matched pairs", color="tab:green")
    ax.set_xlabel(f"{similarity} similarity")
    ax.set_ylabel("density")
    ax.set_title(f"{stage}: matched vs random pairs")
    ax.legend()
    path = os.path.join(output_dir, f"similarity_hist_{stage}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args: AnalyzeArguments) -> int:
    model = None
    if args.model:
        from ..modeling import AlignerModel

        model = AlignerModel.from_pretrained(args.model, load_encoders=False)
    features = load_feature_cache(args.features)
    report = analyze(
        features, args.output_dir, model, args.vision_layer, args.text_layer, args.max_samples, args.seed, args.plots
    )
    for stage, stats in report["stages"].items():
        if not stats.get("applicable"):
            print(f"{stage}: not applicable ({stats['reason']})")
            continue
        pairs = stats["pair_similarity"]
        print(
            f"{stage}: gap {stats['modality_gap']:.4f}  gaussian W2 {stats['gaussian_w2']:.4f}  "
            f"sample W2 {stats['sample_w2']:.4f}  alignment {stats['alignment']:.4f}  "
            f"uniformity {stats['uniformity']:.4f}  matched {pairs['matched_mean']:.3f} vs random "
            f"{pairs['random_mean']:.3f}"
        )
    print(f"report: {os.path.join(args.output_dir, 'analysis.json')}")
    return 0


COMMAND = CommandSpec("analyze", __doc__.split(": ", 1)[1].split("\n")[0], (AnalyzeArguments,), run)
