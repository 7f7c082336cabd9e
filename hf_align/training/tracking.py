"""Experiment trackers for `hf_align.train` (`AlignmentArguments.report_to`): Accelerate's tracker API, checked names,
hyperparameters they accept, the values a logging step records (read back in one host sync) and the layer-selection
heatmap as an image."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict

import torch
from accelerate import Accelerator

from ..model.modeling import MAX_LOGIT_SCALE


def logged_values(mean_loss: torch.Tensor, terms: dict, logit_scale: torch.Tensor) -> dict[str, float]:
    """What a logging step records, read back in one host sync: `loss` (`mean_loss`, the mean of the steps since the
    last logging step), `loss_<term>` (each term of `terms`, the last step's) and `temperature`, the 1/exp(logit_scale)
    that divides the cosine similarities (the scale clamped at `MAX_LOGIT_SCALE` as in the forward pass)."""
    names = ["loss", *(f"loss_{k}" for k in terms), "temperature"]
    values = [mean_loss.detach().float().reshape(()), *(v.detach().float() for v in terms.values())]
    values.append(logit_scale.detach().float().clamp(max=MAX_LOGIT_SCALE).neg().exp().reshape(()))
    return dict(zip(names, torch.stack(values).tolist()))


def check_report_to(report_to, output_dir: str | None) -> list[str]:
    """`report_to` as a list of distinct installed Accelerate tracker names (a single name may be given as a str)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    names = [report_to] if isinstance(report_to, str) else report_to
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"report_to must be a list of Accelerate tracker names, got {report_to!r}")
    installed = sorted(str(tracker) for tracker in get_available_trackers())
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(
                f"report_to has {name!r}, which is not an Accelerate tracker (known: {sorted(LOGGER_TYPE_TO_CLASS)}; "
                f"installed here: {installed or 'none'})"
            )
        if name not in installed:
            raise ValueError(
                f"report_to has {name!r}, but its package is not installed (installed trackers: {installed or 'none'})"
            )
        if LOGGER_TYPE_TO_CLASS[name].requires_logging_directory and output_dir is None:
            raise ValueError(f"report_to has {name!r}, which writes its logs under output_dir; give an output_dir")
    return list(dict.fromkeys(names))


def tracker_config(args) -> dict:
    """The `AlignmentArguments` as tracker hyperparameters: tensorboard's take only numbers, strings and booleans,
    so None, lists and dicts are given as their JSON text."""
    return {
        k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v, sort_keys=True)
        for k, v in asdict(args).items()
    }


def log_layer_selection(accelerator: Accelerator, report, step: int) -> None:
    """The layer-selection heatmap (`LayerSelectionReport.plot`) for the trackers that take images: an image for
    tensorboard and wandb (`log_images`), a run artifact for mlflow; trackio's Accelerate tracker takes no images."""
    if not accelerator.is_main_process:
        return
    from matplotlib.image import imread  # matplotlib is imported only when a heatmap is logged

    with tempfile.TemporaryDirectory() as folder:
        path = report.plot(os.path.join(folder, "layer_selection.png"))
        image = (imread(path)[None, ..., :3] * 255).round().astype("uint8")  # (1, H, W, 3) RGB, alpha dropped
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"layer_selection": image}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({"layer_selection": image}, step=step)
            elif tracker.name == "mlflow":
                tracker.log_artifact(path)
