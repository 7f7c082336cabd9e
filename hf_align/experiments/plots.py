"""Figures of `hf-align analyze`: where the two modalities' embeddings lie, and how matched pairs score against
random ones. Each function writes one PNG into `output_dir` and returns its path; matplotlib renders off-screen."""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's backend alone

__all__ = ["plot_projection", "plot_similarity_histogram"]


def plot_projection(images, texts, stage: str, stats: dict, output_dir: str) -> str:
    """Both modalities' L2-normalised embeddings on the first two principal components of their union, with each
    modality's mean marked; the title gives the modality gap and sample W2 from `stats` (a `geometry_report`).

    Args:
        images / texts: (n, d) embeddings (torch tensors or arrays) of the same width.
        stage: the figure's name (`projection_{stage}.png`) and the title's first word, e.g. `"before"`.
    """
    x = np.asarray(images.detach().cpu().double() if hasattr(images, "detach") else images)
    y = np.asarray(texts.detach().cpu().double() if hasattr(texts, "detach") else texts)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    joint = np.concatenate([x, y])
    mean = joint.mean(0)
    _, _, vt = np.linalg.svd(joint - mean, full_matrices=False)  # joint PCA of both modalities
    px, py = (x - mean) @ vt[:2].T, (y - mean) @ vt[:2].T
    figure = Figure(figsize=(5.5, 5))
    axes = figure.add_subplot()
    axes.scatter(px[:, 0], px[:, 1], s=4, alpha=0.5, label="image", color="tab:blue")
    axes.scatter(py[:, 0], py[:, 1], s=4, alpha=0.5, label="text", color="tab:orange")
    for points, color in ((px, "tab:blue"), (py, "tab:orange")):
        axes.scatter(*points.mean(0), s=150, marker="X", color=color, edgecolor="black")
    axes.set_title(
        f"{stage}: PCA of L2-normalised embeddings\ngap {stats['modality_gap']:.3f}, W2 {stats['sample_w2']:.3f}"
    )
    axes.set_xlabel("PC 1")
    axes.set_ylabel("PC 2")
    axes.legend(markerscale=3)
    return _save(figure, os.path.join(output_dir, f"projection_{stage}.png"))


def plot_similarity_histogram(matched, shuffled, stage: str, similarity: str, output_dir: str) -> str:
    """Histograms (densities, shared bins) of the similarities of matched pairs and of random pairs.

    Args:
        matched / shuffled: (n,) similarity scores, e.g. from `hf_align.functional.geometry.pair_similarities`.
        similarity: the head's name, for the x axis.
    """
    figure = Figure(figsize=(5.5, 4))
    axes = figure.add_subplot()
    bins = np.histogram_bin_edges(np.concatenate([matched, shuffled]), bins=50)
    axes.hist(shuffled, bins=bins, alpha=0.6, density=True, label="random pairs", color="tab:gray")
    axes.hist(matched, bins=bins, alpha=0.6, density=True, label="matched pairs", color="tab:green")
    axes.set_xlabel(f"{similarity} similarity")
    axes.set_ylabel("density")
    axes.set_title(f"{stage}: matched vs random pairs")
    axes.legend()
    return _save(figure, os.path.join(output_dir, f"similarity_hist_{stage}.png"))


def _save(figure: Figure, path: str) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path
