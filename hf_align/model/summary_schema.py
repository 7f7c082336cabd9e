"""The shape of `AlignerConfig.training_summary`, checked before a model card is rendered from it.

The summary travels in `config.json`, so an aligner downloaded from someone else's repo brings its own. It is
metadata: a malformed one never stops the model from loading or running, but rendering a card (`save_pretrained`,
`push_to_hub`, `hf-align push`) from it raises a `ValueError` naming the field, instead of a bare `KeyError` or
`AttributeError` from deep inside the template.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real
from typing import Any

from .configuration import TASK_RETRIEVAL, TASK_SEGMENTATION, TASK_ZERO_SHOT

TASKS = (TASK_ZERO_SHOT, TASK_RETRIEVAL, TASK_SEGMENTATION)
_TEXT_OR_NONE = (str, type(None))
_DATASET_FIELDS = {"id": _TEXT_OR_NONE, "name": _TEXT_OR_NONE, "config": _TEXT_OR_NONE, "split": _TEXT_OR_NONE}
_DATASET_FIELDS |= {"revision": _TEXT_OR_NONE, "num_rows": (int, type(None))}
_SELECTION_FIELDS = {"metric": str, "vision_layers": list, "text_layers": list, "scores": list, "n_samples": int}
_SELECTION_FIELDS |= {"seed": int, "best_score": Real, "best_vision_layer": (int, str), "best_text_layer": (int, str)}


def check_training_summary(summary: Any) -> None:
    """Raise `ValueError` naming the first field of `summary` that the card cannot render."""
    _expect("training_summary", summary, Mapping, "a mapping")
    for key, kind in (("trainer", str), ("train_pairs", int), ("eval_pairs", int), ("global_step", int)):
        if summary.get(key) is not None:
            _expect(f"training_summary[{key!r}]", summary[key], kind, kind.__name__)
    if summary.get("train_runtime_s") is not None:
        _number("training_summary['train_runtime_s']", summary["train_runtime_s"])
    _metrics("training_summary['final_eval']", summary.get("final_eval", {}))
    _expect("training_summary['training_args']", summary.get("training_args", {}), Mapping, "a mapping")
    for i, row in enumerate(_list("training_summary['training_logs']", summary.get("training_logs", []))):
        _expect(f"training_summary['training_logs'][{i}]", row, Mapping, "a mapping")
    for i, dataset in enumerate(_list("training_summary['train_datasets']", summary.get("train_datasets", []))):
        _dataset(f"training_summary['train_datasets'][{i}]", dataset)
    for i, run in enumerate(_list("training_summary['evaluations']", summary.get("evaluations", []))):
        where = f"training_summary['evaluations'][{i}]"
        _expect(where, run, Mapping, "a mapping")
        if run.get("task") not in TASKS:
            raise ValueError(f"{where}['task'] must be one of {list(TASKS)}, got {run.get('task')!r}")
        _metrics(f"{where}['metrics']", run.get("metrics"))
        _dataset(f"{where}['dataset']", run.get("dataset", {}))
        if run.get("details") is not None:
            _expect(f"{where}['details']", run["details"], str, "a string")
    selection = summary.get("layer_selection")
    if selection:
        _expect("training_summary['layer_selection']", selection, Mapping, "a mapping")
        for key, kind in _SELECTION_FIELDS.items():
            _expect(f"training_summary['layer_selection'][{key!r}]", selection.get(key), kind, _names(kind))


def _expect(where: str, value: Any, kind, expected: str) -> None:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, Real)):
        raise ValueError(f"{where} must be {expected}, got {type(value).__name__} {_short(value)}")


def _number(where: str, value: Any) -> None:
    _expect(where, value, Real, "a number")


def _list(where: str, value: Any) -> list:
    _expect(where, value, list, "a list")
    return value


def _metrics(where: str, metrics: Any) -> None:
    _expect(where, metrics, Mapping, "a mapping of metric names to numbers")
    for name, value in metrics.items():
        _expect(f"{where} key", name, str, "a string")
        _number(f"{where}[{name!r}]", value)


def _dataset(where: str, dataset: Any) -> None:
    _expect(where, dataset, Mapping, "a mapping")
    for key, kind in _DATASET_FIELDS.items():
        if key in dataset:
            _expect(f"{where}[{key!r}]", dataset[key], kind, _names(kind))


def _names(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("None" if k is type(None) else k.__name__ for k in kinds)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
