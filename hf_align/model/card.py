"""Model cards written from what happened to an aligner (sentence-transformers' approach).

Everything the card says comes from the model itself: its config (encoders and pinned revisions, layers, pooling,
method and settings) and its card data, `model.model_card_data` (an `AlignerModelCardData`), onto which each run
records what it did: `hf_align.train` / `CardDataCallback` the training run (data sizes, steps, runtime, hardware,
non-default arguments, validation metrics, losses), layer selection the chosen layers and their scores, and the
caller every evaluation it wants listed (`model.model_card_data.add_evaluation(hf_align.evaluate_zero_shot(...))`).
The card data is kept in `config.training_summary`, which travels in `config.json`, so a reloaded model re-saves the
same card.

The YAML header carries `base_model` (both encoders, when they are Hub ids), `datasets` and a `model-index` with one
`EvalResult` per recorded metric, so the Hub shows the evaluation results.

This module renders; it imports the model only for type annotations. Uploading lives in `hf_align.model.hub`.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..encoders.taps import describe_tap_in_words
from ..methods.citations import model_citations
from .card_template import TEMPLATE
from .configuration import TASK_RETRIEVAL, TASK_SEGMENTATION, TASK_ZERO_SHOT
from .hub import upload_aligner
from .summary_schema import check_training_summary

if TYPE_CHECKING:
    from ..evaluation.zero_shot_retrieval import EvaluationResult
    from .modeling import AlignerModel

TASK_NAMES = {
    TASK_ZERO_SHOT: "Zero-shot image classification",
    TASK_RETRIEVAL: "Image-text retrieval",
    TASK_SEGMENTATION: "Zero-shot semantic segmentation",
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_METRIC_NAMES = {
    "top1": "Top-1 accuracy",
    "top5": "Top-5 accuracy",
    "mean_per_class_recall": "Mean per-class recall",
    "loss": "Loss",
    "mIoU": "Mean IoU",
    "mean_iou": "Mean IoU",
    "pixel_accuracy": "Pixel accuracy",
}
_SELECTION_METRICS = {"mutual_knn": "mutual k-NN alignment", "cka": "linear CKA", "unbiased_cka": "unbiased linear CKA"}
_MAX_LOG_ROWS = 25
# What describes the setup rather than the weights: kept when a new training run starts.
_KEPT_ACROSS_RUNS = ("layer_selection", "train_datasets")
_VERSIONED_PACKAGES = ("transformers", "torch", "datasets", "accelerate", "huggingface_hub", "evaluate", "safetensors")


# ---------------------------------------------------------------------------------------------- recording
def describe_dataset(
    dataset=None, name: str | None = None, split: str | None = None, num_rows: int | None = None
) -> dict[str, Any]:
    """What a card says about a dataset: `name`, and when known `id` (Hub id), `revision`, `config`, `split`,
    `num_rows`.

    Explicit arguments win; the rest is read off a `datasets.Dataset` loaded from the Hub (its download checksums
    name `hf://datasets/<id>@<revision>/...`, as sentence-transformers reads them).
    """
    info: dict[str, Any] = {}
    if dataset is not None:
        dataset_info = getattr(dataset, "info", None)
        if getattr(dataset_info, "dataset_name", None):
            info["name"] = dataset_info.dataset_name
        if getattr(dataset_info, "config_name", None) not in (None, "default"):
            info["config"] = dataset_info.config_name
        if getattr(dataset, "split", None) is not None:
            info["split"] = str(dataset.split)
        for source in getattr(dataset_info, "download_checksums", None) or {}:
            if source.startswith("hf://datasets/") and "@" in source:
                repo, rest = source[len("hf://datasets/") :].split("@", 1)
                info["id"] = repo
                revision = rest.split("/")[0]
                if len(revision) == 40:
                    info["revision"] = revision
                break
        if hasattr(dataset, "__len__"):
            info["num_rows"] = len(dataset)
    if name is not None:
        info["name"] = name
        if _REPO_ID.match(name) and "/" in name and not os.path.exists(name):
            info.setdefault("id", name)
    if split is not None:
        info["split"] = split
    if num_rows is not None:
        info["num_rows"] = num_rows
    return info


class AlignerModelCardData:
    """What the model card says beyond the config, recorded onto the model as it happens (sentence-transformers'
    `SentenceTransformerModelCardData`): the training run, its datasets and the evaluations the caller records; layer
    selection adds its report. A view over `model.config.training_summary`, so the record is saved in `config.json`.
    Reach it as `model.model_card_data`; `generate_model_card` renders it.

    Args:
        model (`AlignerModel`): the model described.
    """

    def __init__(self, model: AlignerModel):
        self.model = model

    @property
    def summary(self) -> dict[str, Any]:
        """The record as stored (`config.training_summary`); change it through the methods of this class."""
        return self.model.config.training_summary

    def _update(self, **entries: Any) -> None:
        self.model.config.training_summary = {**self.summary, **entries}

    def add_evaluation(
        self,
        task: str | EvaluationResult,
        metrics: Mapping[str, float] | None = None,
        dataset=None,
        dataset_name: str | None = None,
        dataset_split: str | None = None,
        num_samples: int | None = None,
        details: str | None = None,
    ) -> dict[str, Any]:
        """Add one evaluation run to the card's `model-index` (`summary["evaluations"]`); returns the stored entry.

        Args:
            task: what an `evaluate_*` function returned (an `EvaluationResult`: the task, metrics, data and protocol
                come from it; `dataset*`, `num_samples` and `details` given here win over its own), or a task id
                (`TASK_ZERO_SHOT`, `TASK_RETRIEVAL`, `TASK_SEGMENTATION`) with `metrics`.
            metrics: metric name -> number, with a task id only.
            dataset / dataset_name / dataset_split / num_samples: the evaluated data (see `describe_dataset`).
            details: one line of protocol for the card (e.g. "80 CLIP templates, 10 classes").

        A later run of the same task on the same dataset and split replaces the earlier one, so the card lists what
        the model scores now.
        """
        if not isinstance(task, str):
            if metrics is not None or not hasattr(task, "card_metrics"):
                raise TypeError(
                    "add_evaluation takes what an evaluate_* function returned (alone), or a task id with metrics; "
                    f"got task={type(task).__name__} and metrics={type(metrics).__name__}"
                )
            result, task, metrics = task, task.task, task.card_metrics
            dataset = result.dataset if dataset is None else dataset
            dataset_name = result.dataset_name if dataset_name is None else dataset_name
            dataset_split = result.dataset_split if dataset_split is None else dataset_split
            num_samples = result.num_samples if num_samples is None else num_samples
            details = result.details if details is None else details
        if task not in TASK_NAMES:
            raise ValueError(f"task must be one of {sorted(TASK_NAMES)}, got {task!r}")
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a mapping of metric name -> number, got {type(metrics).__name__}")
        values = {}
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"metric {key!r} must be a number, got {value!r}")
            values[key] = float(value)
        entry = {
            "task": task,
            "dataset": describe_dataset(dataset, dataset_name, dataset_split, num_samples),
            "metrics": values,
        }
        if details:
            entry["details"] = details
        key = _evaluation_key(entry)
        kept = [e for e in self.summary.get("evaluations", []) if _evaluation_key(e) != key]
        self._update(evaluations=kept + [entry])
        return entry

    def add_training_dataset(
        self, dataset=None, name: str | None = None, split: str | None = None, num_rows: int | None = None
    ) -> dict[str, Any]:
        """Note a source dataset the aligner was trained on (the feature cache itself no longer knows its name); a
        dataset already listed with the same id (or name) and split is replaced. Returns the stored entry."""
        info = describe_dataset(dataset, name, split, num_rows)
        if "name" not in info and "id" not in info:
            raise ValueError("a training dataset needs a name: pass name=... or a datasets.Dataset loaded from the Hub")
        same = (info.get("id") or info.get("name"), info.get("split"))
        kept = [
            d for d in self.summary.get("train_datasets", []) if (d.get("id") or d.get("name"), d.get("split")) != same
        ]
        self._update(train_datasets=kept + [info])
        return info

    def start_training_run(self) -> None:
        """Forget what described the previous weights (an earlier run, evaluations of the old weights); the layer
        selection and the training datasets, which describe the setup, are kept."""
        summary = self.summary
        self.model.config.training_summary = {k: summary[k] for k in _KEPT_ACROSS_RUNS if k in summary}

    def set_training_run(
        self,
        *,
        trainer: str,
        train_pairs: int | None,
        eval_pairs: int,
        global_step: int,
        best_step: int | None,
        runtime_s: float,
        device: torch.device | str,
        mixed_precision: str,
        training_args: Mapping[str, Any],
        final_eval: Mapping[str, float],
        training_logs: Sequence[Mapping[str, Any]],
    ) -> None:
        """Record a finished training run: who trained (`"hf_align.train"`, `"transformers.Trainer"`), on how many
        pairs, for how many optimiser steps (the kept best one), how long and on which `device`, the non-default
        arguments, the last validation metrics and the loss log (rows of `epoch`, `step`, `training_loss`,
        `validation_loss`)."""
        self._update(
            trainer=trainer,
            train_pairs=train_pairs,
            eval_pairs=eval_pairs,
            global_step=global_step,
            best_step=best_step,
            train_runtime_s=round(runtime_s, 3),
            hardware=hardware_description(device),
            mixed_precision=mixed_precision,
            training_args=dict(training_args),
            final_eval=dict(final_eval),
            training_logs=list(training_logs),
        )

    def generate_model_card(
        self, model_id: str | None = None, tags: Sequence[str] = (), bundled: bool | None = None
    ) -> ModelCard:
        """The model's card (see the module function `generate_model_card`)."""
        return generate_model_card(self.model, model_id, tags, bundled)


def record_evaluation(
    model: AlignerModel,
    task: str | EvaluationResult,
    metrics: Mapping[str, float] | None = None,
    dataset=None,
    dataset_name: str | None = None,
    dataset_split: str | None = None,
    num_samples: int | None = None,
    details: str | None = None,
) -> dict[str, Any]:
    """Add one evaluation run to the model's card: `AlignerModelCardData.add_evaluation` (same arguments), e.g.
    `hf_align.record_evaluation(model, hf_align.evaluate_retrieval(model, processor, test_set))`."""
    return AlignerModelCardData(model).add_evaluation(
        task, metrics, dataset, dataset_name, dataset_split, num_samples, details
    )


def record_training_dataset(
    model: AlignerModel, dataset=None, name: str | None = None, split: str | None = None, num_rows: int | None = None
) -> dict[str, Any]:
    """Note a source dataset the aligner was trained on: `AlignerModelCardData.add_training_dataset`."""
    return AlignerModelCardData(model).add_training_dataset(dataset, name, split, num_rows)


def hardware_description(device: torch.device | str) -> str:
    """The accelerator a run used, as the card prints it: the CUDA device name, or `cpu (<n> cores)`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({os.cpu_count()} cores)"


def _evaluation_key(entry: Mapping) -> tuple:
    dataset = entry.get("dataset", {})
    return entry["task"], dataset.get("id") or dataset.get("name"), dataset.get("config"), dataset.get("split")


# ---------------------------------------------------------------------------------------------- YAML header
def eval_results(model: AlignerModel) -> list[EvalResult]:
    """One `EvalResult` per metric of every recorded evaluation run, values exactly as recorded."""
    results = []
    for run in model.config.training_summary.get("evaluations", []):
        dataset = run.get("dataset", {})
        name = dataset.get("name") or dataset.get("id") or "unnamed dataset"
        for metric, value in ordered_metrics(run["metrics"]):
            results.append(
                EvalResult(
                    task_type=run["task"],
                    task_name=TASK_NAMES[run["task"]],
                    dataset_type=dataset.get("id") or name,
                    dataset_name=name,
                    dataset_config=dataset.get("config"),
                    dataset_split=dataset.get("split"),
                    dataset_revision=dataset.get("revision"),
                    metric_type=metric,
                    metric_name=metric_display_name(metric),
                    metric_value=value,
                )
            )
    return results


def ordered_metrics(metrics: Mapping[str, float]) -> list[tuple[str, float]]:
    """Metrics in reading order (loss, top-k, per-class recall, R@k by k and direction), whatever the dict order:
    config.json stores nested keys sorted, so a reloaded record must not depend on insertion order."""

    def rank(key: str) -> tuple:
        name = key.removeprefix("eval_")
        if name == "loss":
            return 0, 0, 0, name
        top = re.fullmatch(r"top(\d+)", name)
        if top:
            return 1, int(top.group(1)), 0, name
        recall = re.fullmatch(r"(image_to_text|text_to_image|mean)_R@(\d+)", name)
        if recall:
            return 3, int(recall.group(2)), ("image_to_text", "text_to_image", "mean").index(recall.group(1)), name
        return 2, 0, 0, name

    return sorted(metrics.items(), key=lambda item: rank(item[0]))


def metric_display_name(key: str) -> str:
    """`image_to_text_R@5` -> `Image→text R@5`; `top1` -> `Top-1 accuracy`; unknown keys are returned as they are."""
    if key in _METRIC_NAMES:
        return _METRIC_NAMES[key]
    match = re.fullmatch(r"(image_to_text|text_to_image|mean)_R@(\d+)", key)
    if match:
        direction = {"image_to_text": "Image→text", "text_to_image": "Text→image", "mean": "Mean"}[match.group(1)]
        return f"{direction} R@{match.group(2)}"
    return key


def hub_encoder_ids(config) -> list[str]:
    """The encoders that are Hub repositories (local folders cannot be a card's `base_model`)."""
    ids = []
    for name in (config.vision_encoder, config.text_encoder):
        if name and _REPO_ID.match(name) and not os.path.isabs(name) and not os.path.isdir(name):
            ids.append(name)
    return ids


def default_model_name(config) -> str:
    parts = [os.path.basename(str(n).rstrip("/\\")) for n in (config.vision_encoder, config.text_encoder) if n]
    return "-".join(parts + [config.method, "aligner"])


def card_data(model: AlignerModel, model_id: str | None = None, tags: Sequence[str] = ()) -> ModelCardData:
    """The YAML header: library, pipeline tag, tags, `base_model` (both encoders), datasets and `model-index`."""
    config = model.config
    summary = config.training_summary
    check_training_summary(summary)
    all_tags = ["hf_align", "image-text-alignment", "clip", f"aligner-{config.method}"]
    if summary.get("trainer") == "transformers.Trainer":
        all_tags.append("generated_from_trainer")
    all_tags += [t for t in tags if t not in all_tags]
    dataset_ids = [d["id"] for d in summary.get("train_datasets", []) if d.get("id")]
    base_models = hub_encoder_ids(config)
    results = eval_results(model)
    extra = {"base_model_relation": "adapter"} if base_models else {}
    return ModelCardData(
        library_name="hf_align",
        pipeline_tag=TASK_ZERO_SHOT,
        tags=all_tags,
        base_model=base_models or None,
        datasets=dataset_ids or None,
        eval_results=results or None,
        model_name=(model_id or default_model_name(config)) if results else None,
        **extra,
    )


# ---------------------------------------------------------------------------------------------- rendering
def generate_model_card(
    model: AlignerModel, model_id: str | None = None, tags: Sequence[str] = (), bundled: bool | None = None
) -> ModelCard:
    """The full card of `model`; `model_id` (repo id or folder) is what the usage snippet loads. `bundled` says whether
    the encoders are saved alongside (default: what the model's config says)."""
    config = model.config
    summary = config.training_summary
    check_training_summary(summary)
    model_id = model_id or default_model_name(config)
    final_eval = ordered_metrics(summary.get("final_eval", {}))
    return ModelCard.from_template(
        card_data(model, model_id, tags),
        template_str=TEMPLATE,
        model_name=model_id,
        model_id=model_id,
        vision=_encoder_facts(config, "vision"),
        text=_encoder_facts(config, "text"),
        method=config.method,
        method_settings=_settings(_non_default_method_settings(config)),
        regularizers=", ".join(f"`{n}` ({_settings(kw) or 'defaults'})" for n, kw in config.regularizers.items()),
        similarity=config.similarity,
        similarity_settings=_settings(config.similarity_config),
        temperature=_fmt(config.contrastive_temperature),
        learnable_temperature=config.learnable_temperature,
        embed_dim=getattr(model.aligner, "embed_dim", None),
        num_parameters=f"{_aligner_parameter_count(model):,}",
        bundled=config.bundled_encoders if bundled is None else bundled,
        train_pairs=summary.get("train_pairs"),
        layer_selection=_layer_selection_text(summary.get("layer_selection")),
        evaluations=[_evaluation_view(run) for run in summary.get("evaluations", [])],
        train_datasets=[_dataset_view(d) for d in summary.get("train_datasets", [])],
        training=_training_rows(summary),
        hyperparameters=[(k, _fmt(v)) for k, v in sorted(summary.get("training_args", {}).items())],
        final_eval=[(metric_display_name(k.removeprefix("eval_")), _fmt(v)) for k, v in final_eval],
        training_logs=_log_rows(summary.get("training_logs", [])),
        versions=library_versions(),
        citations=model_citations(model),
    )


def write_model_card(
    model: AlignerModel, save_directory: str | os.PathLike, model_id: str | None = None, tags: Sequence[str] = ()
) -> str:
    """Write `README.md` into `save_directory` (what `save_pretrained` calls); returns its path."""
    path = os.path.join(save_directory, "README.md")
    generate_model_card(model, model_id or os.fspath(save_directory), tags).save(path)
    return path


def library_versions() -> list[tuple[str, str]]:
    from importlib.metadata import PackageNotFoundError, version

    from ..version import __version__

    versions = [("Python", platform.python_version()), ("hf_align", __version__)]
    for package in _VERSIONED_PACKAGES:
        try:
            versions.append((package, version(package)))
        except PackageNotFoundError:
            continue
    return versions


def _encoder_facts(config, modality: str) -> dict[str, Any]:
    name = getattr(config, f"{modality}_encoder")
    is_hub = name in hub_encoder_ids(config)
    revision = getattr(config, f"{modality}_revision")
    if is_hub:
        link = f"[{name}](https://huggingface.co/{name})"
    else:
        link = f"`{name}` (local folder)" if name else "none recorded (aligner built from feature widths)"
    return {
        "link": link,
        "revision": f"`{revision}`" if revision else ("latest" if is_hub else "n/a (local)"),
        "layer": getattr(config, f"{modality}_layer"),
        "features": _features_read(config, modality),
        "width": getattr(config, f"{modality}_hidden_size"),
    }


def _features_read(config, modality: str) -> str:
    """What the aligner reads from the encoder (its tap), in words for the card."""
    if getattr(config, f"{modality}_layer") == "auto":
        return f"hidden states pooled by `{getattr(config, f'resolved_{modality}_pooling')}` (layer to be selected)"
    text = describe_tap_in_words(config.tap(modality), config.num_prefix_tokens(modality), config.text_pipeline)
    return text + (" (pooling `auto`)" if getattr(config, f"{modality}_pooling") == "auto" else "")


def _non_default_method_settings(config) -> dict[str, Any]:
    from ..methods import get_method

    defaults = {}
    for field in dataclasses.fields(get_method(config.method).config_class):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    return {k: v for k, v in config.method_config.items() if k not in defaults or defaults[k] != v}


def _aligner_parameter_count(model: AlignerModel) -> int:
    """Trainable parameters of the checkpoint (`aligner_state_dict`: everything but the frozen encoders)."""
    saved = model.aligner_state_dict().keys()
    return sum(p.numel() for n, p in model.named_parameters() if n in saved and p.requires_grad)


def _layer_selection_text(selection: Mapping | None) -> str:
    """Markdown for `hf_align.training.layer_selection`'s record: the chosen pair, why, and the whole score matrix."""
    if not selection:
        return ""
    metric = _SELECTION_METRICS.get(selection["metric"], selection["metric"])
    vision_layers, text_layers = selection["vision_layers"], selection["text_layers"]
    best = (selection["best_vision_layer"], selection["best_text_layer"])
    sample = f"{selection['n_samples']} cached pairs (seed {selection['seed']}"
    sample += f", k = {selection['k']})" if selection.get("k") is not None else ")"
    lines = [
        f"The layers were chosen by `hf_align.select_layers`: vision layer **{best[0]}** and text layer "
        f"**{best[1]}** give the highest {metric} ({_fmt(selection['best_score'])}) of the "
        f"{len(vision_layers)} × {len(text_layers)} layer pairs scored on {sample}.",
        "",
        "| Vision layer \\ text layer | " + " | ".join(str(t) for t in text_layers) + " |",
        "|---|" + "---|" * len(text_layers),
    ]
    for v, row in zip(vision_layers, selection["scores"]):
        cells = [f"**{_fmt(s)}**" if (v, t) == best else str(_fmt(s)) for t, s in zip(text_layers, row)]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _evaluation_view(run: Mapping) -> dict[str, Any]:
    dataset = run.get("dataset", {})
    label = dataset.get("name") or dataset.get("id") or "unnamed dataset"
    if dataset.get("split"):
        label += f" ({dataset['split']})"
    details = run.get("details") or (f"{dataset['num_rows']} samples" if dataset.get("num_rows") else "")
    return {
        "task_name": TASK_NAMES[run["task"]],
        "dataset": label,
        "details": details,
        "metrics": [(metric_display_name(k), _fmt(v)) for k, v in ordered_metrics(run["metrics"])],
    }


def _dataset_view(dataset: Mapping) -> dict[str, Any]:
    name = dataset.get("name") or dataset.get("id")
    label = f"[{name}](https://huggingface.co/datasets/{dataset['id']})" if dataset.get("id") else name
    if dataset.get("revision"):
        label += f" @ `{dataset['revision'][:8]}`"
    return {"label": label, "split": dataset.get("split", ""), "num_rows": dataset.get("num_rows", "")}


def _training_rows(summary: Mapping) -> list[tuple[str, Any]]:
    names = (
        ("trainer", "Trained with"),
        ("train_pairs", "Training pairs"),
        ("eval_pairs", "Validation pairs"),
        ("global_step", "Optimiser steps"),
        ("best_step", "Best step (kept)"),
        ("train_runtime_s", "Training time"),
        ("hardware", "Hardware"),
        ("mixed_precision", "Mixed precision"),
    )
    rows = []
    for key, label in names:
        if summary.get(key) is None:
            continue
        value = summary[key]
        rows.append((label, _duration(value) if key == "train_runtime_s" else _fmt(value)))
    return rows


def _log_rows(logs: Sequence[Mapping]) -> list[dict[str, Any]]:
    """At most `_MAX_LOG_ROWS` evenly spaced rows (always the last one) of the training log."""
    if len(logs) > _MAX_LOG_ROWS:
        step = len(logs) / _MAX_LOG_ROWS
        logs = [logs[int(i * step)] for i in range(_MAX_LOG_ROWS - 1)] + [logs[-1]]
    columns = ("epoch", "step", "training_loss", "validation_loss")
    return [{k: _fmt(row[k]) if row.get(k) is not None else "-" for k in columns} for row in logs]


def _settings(values: Mapping) -> str:
    return ", ".join(f"`{k}={v!r}`" for k, v in values.items())


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4f}".rstrip("0").rstrip(".")
    return value


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


__all__ = [
    "AlignerModelCardData",
    "TASK_RETRIEVAL",
    "TASK_SEGMENTATION",
    "TASK_ZERO_SHOT",
    "card_data",
    "describe_dataset",
    "eval_results",
    "generate_model_card",
    "hardware_description",
    "record_evaluation",
    "record_training_dataset",
    "upload_aligner",
    "write_model_card",
]
