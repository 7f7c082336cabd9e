"""Method × similarity leaderboard: every combination trained on one feature cache with the same budget and seeds.

`compare(features, methods, similarities, seeds, args)` trains each (method, similarity head) pair with
`hf_align.train` under identical `AlignmentArguments` (steps, batch size, learning rate, schedule; only the seed
varies, and every combination sees the same seeds), then scores it on one held-out split of the cache shared by all
runs:

* retrieval: recall@1/5/10 both ways (`hf_align.evaluation.evaluate_retrieval`, which scores with the model's head);
* zero-shot classification, when the cache has a label column (default `label`; the synthetic task's cluster id):
  class prototype = the renormalised mean of the aligned *training* text embeddings of that class, test images
  scored against the prototypes with the model's own similarity head (so a learned head is evaluated as trained),
  top-1 / top-5 / mean per-class recall (`zero_shot_metrics`). Without a label column zero-shot is skipped (the
  leaderboard says so in its notes) rather than invented from captions;
* the modality gap of the aligned test embeddings (`hf_align.functional.geometry.modality_gap`);
* wall-clock training time and parameter counts (trainable, and everything the checkpoint stores).

Combinations the library rejects at configuration time (a learned head with a training-free method, a token method
on a cache without token features) are listed as `n/a` with the reason; a run that fails while training is listed as
`failed` with the error, and the others go on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_RANK_BY = "mean_R@1"  # instance-level retrieval; zero-shot saturates on easy class structure
TABLE_COLUMNS = (
    ("zero_shot_top1", "ZS top-1"),
    ("zero_shot_top5", "ZS top-5"),
    ("mean_R@1", "R@1 (mean)"),
    ("image_to_text_R@1", "I→T R@1"),
    ("text_to_image_R@1", "T→I R@1"),
    ("mean_R@5", "R@5 (mean)"),
    ("mean_R@10", "R@10 (mean)"),
    ("modality_gap", "gap"),
)


# Settings sized for the synthetic task (64/48-dim features, ~2k training pairs): what `hf-align compare
# --features synthetic` uses for every setting left at its default. Widths are scaled down from the real-encoder
# defaults (projection 512, 512 anchors, 4096 ASIF anchors) so that no method has more parameters than the data can
# fit, and the budget is the same for every (method, head) pair.
SYNTHETIC_PRESET: dict[str, dict] = {
    "method_kwargs": {
        "linear": {"projection_dim": 64},
        "mlp": {"projection_dim": 64, "hidden_dim": 128},
        "codebook": {"projection_dim": 64, "num_codes": 32},
        "relative": {"num_anchors": 256},
        "token_relative": {"num_anchors": 256},
        "asif": {"num_anchors": 1024, "topk": 256},
    },
    "similarity_kwargs": {"mlp": {"hidden_dim": 128}},
    "training": {"max_steps": 300, "per_device_train_batch_size": 256, "learning_rate": 1e-3, "logging_steps": 100},
}


@dataclass
class LeaderboardEntry:
    """One (method, similarity) combination over all seeds."""

    method: str
    similarity: str
    status: str  # "ok", "n/a" (rejected at configuration time) or "failed"
    reason: str | None = None
    seeds: list[int] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # mean over seeds
    metrics_std: dict[str, float] = field(default_factory=dict)  # population std over seeds (0 for one seed)
    per_seed: list[dict[str, float]] = field(default_factory=list)
    train_time_s: float | None = None  # mean over seeds
    trainable_params: int | None = None
    stored_params: int | None = None

    def score(self, key: str) -> float:
        return self.metrics.get(key, float("-inf")) if self.status == "ok" else float("-inf")


@dataclass
class Leaderboard:
    entries: list[LeaderboardEntry]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    rank_by: str = DEFAULT_RANK_BY

    @property
    def primary_metric(self) -> str:
        return self.rank_by

    def ranked(self) -> list[LeaderboardEntry]:
        key = self.primary_metric
        ok = sorted((e for e in self.entries if e.status == "ok"), key=lambda e: -e.score(key))
        return ok + [e for e in self.entries if e.status != "ok"]

    def get(self, method: str, similarity: str) -> LeaderboardEntry:
        for entry in self.entries:
            if entry.method == method and entry.similarity == similarity:
                return entry
        raise KeyError(f"no entry for method={method!r}, similarity={similarity!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "primary_metric": self.primary_metric,
            "settings": self.settings,
            "notes": self.notes,
            "entries": [dataclasses.asdict(e) for e in self.ranked()],
        }

    def to_json(self) -> str:
        return json.dumps(_finite(self.to_dict()), indent=2)

    def to_markdown(self) -> str:
        have = {k for e in self.entries for k in e.metrics}
        columns = [(k, title) for k, title in TABLE_COLUMNS if k in have]
        multi_seed = any(len(e.seeds) > 1 for e in self.entries)
        header = ["#", "method", "similarity"] + [t for _, t in columns] + ["train s", "trainable params", "status"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        rank = 0
        for entry in self.ranked():
            if entry.status == "ok":
                rank += 1
                cells = [str(rank), entry.method, entry.similarity]
                for key, _ in columns:
                    cells.append(_cell(entry.metrics.get(key), entry.metrics_std.get(key), multi_seed, key))
                cells += [f"{entry.train_time_s:.1f}", f"{entry.trainable_params:,}", "ok"]
            else:
                cells = ["–", entry.method, entry.similarity] + ["–"] * len(columns) + ["–", "–"]
                cells.append(f"{entry.status}: {_short(entry.reason)}")
            lines.append("| " + " | ".join(cells) + " |")
        seeds = self.settings.get("seeds")
        intro = (
            f"Ranked by {self.primary_metric} on the held-out split ({self.settings.get('n_test_rows')} rows); "
            f"trained on {self.settings.get('n_train_rows')} rows, seeds {seeds}"
            + (", mean ± std over seeds." if multi_seed else ".")
            + " Recall and accuracy in percent."
        )
        notes = "".join(f"\n- {n}" for n in self.notes)
        return intro + "\n\n" + "\n".join(lines) + ("\n\nNotes:" + notes if notes else "") + "\n"

    def save(self, output_dir: str | os.PathLike) -> dict[str, str]:
        """Write `leaderboard.md` and `leaderboard.json` into `output_dir`; returns their paths."""
        os.makedirs(output_dir, exist_ok=True)
        paths = {
            "markdown": os.path.join(output_dir, "leaderboard.md"),
            "json": os.path.join(output_dir, "leaderboard.json"),
        }
        with open(paths["markdown"], "w", encoding="utf-8") as handle:
            handle.write(self.to_markdown())
        with open(paths["json"], "w", encoding="utf-8") as handle:
            handle.write(self.to_json())
        return paths


def _cell(mean, std, multi_seed: bool, key: str) -> str:
    if mean is None:
        return "–"
    digits = 3 if key == "modality_gap" else 1
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if multi_seed else f"{mean:.{digits}f}"


def _short(reason: str | None, limit: int = 90) -> str:
    text = (reason or "").replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- data
def synthetic_features(n: int = 3000, seed: int = 0, tokens: bool = True, **task_kwargs) -> datasets.Dataset:
    """The synthetic limited-data paired task (`hf_align.testing.make_paired_task`) as an in-memory feature cache.

    Columns: pooled `vision_layer_{l}` / `text_layer_{l}` for every layer, token columns when `tokens=True` (so token
    methods can run too), `image_id` and `label` (the cluster id, which zero-shot classification uses).
    """
    from ..features import features_from_tensors
    from .synthetic import make_paired_task

    task = make_paired_task(n=n, seed=seed, tokens=tokens, **task_kwargs)
    return features_from_tensors(
        task.vision,
        task.text,
        vision_tokens=task.vision_tokens if tokens else None,
        text_tokens=task.text_tokens if tokens else None,
        text_mask=task.text_mask if tokens else None,
        extra_columns={"label": task.labels},
    )


def split_features(
    features: datasets.Dataset, test_fraction: float = 0.2, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split a feature cache by source image (captions of one image stay together) into train and test parts:
    `test_fraction` of the images (at least one, and at least one left to train on), drawn by `split_by_image`."""
    from ..features import split_by_image

    train_rows, test_rows = split_by_image(features, test_fraction, seed, name="test_fraction")
    return features.select(train_rows), features.select(test_rows)


# ---------------------------------------------------------------------------------------------- one run
def _build_model(
    method, similarity, train_features, vision_layer, text_layer, method_kwargs, similarity_kwargs, model_kwargs
):
    from ..features import cached_layers, layer_column
    from ..methods import get_method
    from ..model.modeling import AlignerModel

    tokens = get_method(method).input_kind == "tokens"
    dims = {}
    for modality, layer in (("vision", vision_layer), ("text", text_layer)):
        have = cached_layers(train_features, modality, tokens)
        if not have:
            kind = "token" if tokens else "pooled"
            raise ValueError(f"method {method!r} needs {kind} {modality} features; the cache has none")
        absolute = layer % (max(have) + 1) if layer < 0 else layer
        column = layer_column(modality, absolute, tokens)
        if column not in train_features.column_names:
            raise ValueError(f"the cache has no column {column!r} (layers cached: {have})")
        dims[modality] = int(np.asarray(train_features[0][column]).shape[-1])
    model = AlignerModel.from_feature_dims(
        dims["vision"],
        dims["text"],
        method=method,
        similarity=similarity,
        similarity_config=dict(similarity_kwargs.get(similarity, {})),
        **{**model_kwargs, **method_kwargs.get(method, {})},
    )
    model.config.vision_layer, model.config.text_layer = vision_layer, text_layer
    return model


@torch.no_grad()
def evaluate_run(model, train_features, test_features, label_column: str | None = "label") -> dict[str, float]:
    """Retrieval (and zero-shot, when labelled) metrics of a trained model on the test part of a cache."""
    from ..evaluation.zero_shot_retrieval import (
        embed_feature_cache,
        evaluate_retrieval,
        first_row_per_image,
        zero_shot_metrics,
    )
    from ..functional.geometry import modality_gap

    model.eval()
    metrics = dict(evaluate_retrieval(model, None, test_features))
    first = first_row_per_image(test_features)
    test_rows = test_features.select(first)
    images, texts = embed_feature_cache(model, test_rows)
    metrics["modality_gap"] = modality_gap(images, texts)
    if label_column and label_column in train_features.column_names and label_column in test_features.column_names:
        _, train_texts = embed_feature_cache(model, train_features)
        labels = torch.as_tensor(train_features[label_column]).long()
        classes = torch.unique(labels)
        prototypes = F.normalize(
            torch.stack([F.normalize(train_texts[labels == c], dim=-1).mean(0) for c in classes]), dim=-1
        )
        index = {int(c): i for i, c in enumerate(classes)}
        test_labels = [index.get(int(v), -1) for v in test_rows[label_column]]
        keep = torch.tensor([v >= 0 for v in test_labels])
        if keep.any():
            # The head's unit-norm score, the function the model's forward makes logits with (both sides are
            # normalised here): a learned head is evaluated as it scores.
            scores = model.similarity.score_unit_norm(images[keep.to(images.device)], prototypes.to(images))
            zs = zero_shot_metrics(scores, torch.tensor(test_labels)[keep], ks=(1, min(5, len(classes))))
            metrics["zero_shot_top1"] = zs["top1"]
            metrics["zero_shot_top5"] = zs[f"top{min(5, len(classes))}"]
            metrics["zero_shot_mean_per_class_recall"] = zs["mean_per_class_recall"]
    return metrics


def _param_counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if model.aligner.trainable else 0
    state = model.aligner_state_dict() if hasattr(model, "aligner_state_dict") else model.state_dict()
    stored = sum(v.numel() for k, v in state.items() if k != "logit_scale")
    return int(trainable), int(stored)


# ---------------------------------------------------------------------------------------------- the comparison
def compare(
    features: datasets.Dataset,
    methods: Sequence[str] | None = None,
    similarities: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    args=None,
    test_features: datasets.Dataset | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    label_column: str | None = "label",
    vision_layer: int = -1,
    text_layer: int = -1,
    method_kwargs: dict[str, dict] | None = None,
    similarity_kwargs: dict[str, dict] | None = None,
    model_kwargs: dict | None = None,
    output_dir: str | os.PathLike | None = None,
    rank_by: str = DEFAULT_RANK_BY,
    verbose: bool = True,
) -> Leaderboard:
    """Train every (method, similarity) pair on `features` with the same budget and seeds; rank them.

    Args:
        features: a feature cache (`extract_features`, `features_from_tensors`, `synthetic_features`).
        methods: registry names (default: all of `hf_align.METHODS`).
        similarities: head names (default: all of `hf_align.similarity.SIMILARITIES`).
        seeds: training seeds; every combination runs once per seed (model init, batches, anchors).
        args: `AlignmentArguments` shared by every run (its `seed`, `output_dir` and `save_model` are overridden).
        test_features: held-out cache; default: `test_fraction` of the images of `features`, split with
            `split_seed` (the same split for every run).
        label_column: integer class column for zero-shot (skipped when absent or `None`).
        vision_layer / text_layer: hidden-state index to train on (negative counts from the last cached layer).
        method_kwargs: per-method settings, e.g. `{"linear": {"projection_dim": 64}}`.
        similarity_kwargs: per-head `similarity_config`, e.g. `{"mlp": {"hidden_dim": 128}}`.
        model_kwargs: settings for every model (`temperature`, `learnable_temperature`, regularisers ...).
        output_dir: when given, `leaderboard.md` and `leaderboard.json` are written there.
        rank_by: metric the table is sorted by (default `mean_R@1`: instance-level retrieval separates methods;
            zero-shot on a few well-separated classes tends to saturate), e.g. `zero_shot_top1`.
    """
    from transformers import set_seed

    from ..methods import METHODS
    from ..similarity import SIMILARITIES
    from ..training.arguments import AlignmentArguments
    from ..training.loop import train

    methods = list(methods or sorted(METHODS))
    similarities = list(similarities or sorted(SIMILARITIES))
    unknown = [m for m in methods if m not in METHODS] + [s for s in similarities if s not in SIMILARITIES]
    if unknown:
        raise ValueError(
            f"unknown method(s)/similarity(ies) {unknown}; methods: {sorted(METHODS)}, "
            f"similarities: {sorted(SIMILARITIES)}"
        )
    if not seeds:
        raise ValueError("give at least one seed")
    args = args or AlignmentArguments()
    method_kwargs, similarity_kwargs, model_kwargs = method_kwargs or {}, similarity_kwargs or {}, model_kwargs or {}
    if test_features is None:
        train_features, test_features = split_features(features, test_fraction, split_seed)
    else:
        train_features = features
    notes = []
    if not (label_column and label_column in train_features.column_names):
        notes.append(f"zero-shot skipped: the cache has no label column {label_column!r}")
    else:
        notes.append(
            f"zero-shot: class prototypes = mean aligned training text embedding per {label_column!r}, scored with "
            "each run's own similarity head"
        )
    entries = []
    for method in methods:
        for similarity in similarities:
            entry = LeaderboardEntry(method, similarity, status="ok", seeds=list(seeds))
            runs, times = [], []
            for seed in seeds:
                set_seed(seed)
                try:
                    model = _build_model(
                        method,
                        similarity,
                        train_features,
                        vision_layer,
                        text_layer,
                        method_kwargs,
                        similarity_kwargs,
                        model_kwargs,
                    )
                except (ValueError, TypeError) as err:
                    entry.status, entry.reason = "n/a", str(err).split("\n")[0]
                    break
                run_args = dataclasses.replace(
                    args, seed=seed, output_dir=None, save_model=False, resume_from_checkpoint=None
                )
                try:
                    start = time.perf_counter()
                    train(model, train_features, run_args)
                    times.append(time.perf_counter() - start)
                    runs.append(evaluate_run(model, train_features, test_features, label_column))
                except Exception as err:  # noqa: BLE001 - one broken run must not end the comparison
                    entry.status = "failed"
                    entry.reason = f"{type(err).__name__}: {err}".split("\n")[0]
                    if verbose:
                        traceback.print_exc()
                    break
                entry.trainable_params, entry.stored_params = _param_counts(model)
            if entry.status == "ok":
                entry.per_seed = runs
                keys = sorted(set.intersection(*(set(r) for r in runs)))
                entry.metrics = {k: float(np.mean([r[k] for r in runs])) for k in keys}
                entry.metrics_std = {k: float(np.std([r[k] for r in runs])) for k in keys}
                entry.train_time_s = float(np.mean(times))
            entries.append(entry)
            if verbose:
                shown = {k: round(v, 2) for k, v in entry.metrics.items() if k in dict(TABLE_COLUMNS)}
                print(f"[compare] {method} × {similarity}: {entry.status} {entry.reason or shown}", flush=True)
    settings = {
        "methods": methods,
        "similarities": similarities,
        "seeds": list(seeds),
        "n_train_rows": len(train_features),
        "n_test_rows": len(test_features),
        "vision_layer": vision_layer,
        "text_layer": text_layer,
        "training_args": {k: v for k, v in dataclasses.asdict(args).items() if k not in ("output_dir", "report_to")},
        "method_kwargs": method_kwargs,
        "similarity_kwargs": similarity_kwargs,
        "model_kwargs": model_kwargs,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    board = Leaderboard(entries, settings, notes, rank_by)
    if output_dir is not None:
        board.save(output_dir)
    return board


__all__ = [
    "DEFAULT_RANK_BY",
    "SYNTHETIC_PRESET",
    "Leaderboard",
    "LeaderboardEntry",
    "compare",
    "evaluate_run",
    "split_features",
    "synthetic_features",
]
