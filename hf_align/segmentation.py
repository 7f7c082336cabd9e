"""Zero-shot semantic segmentation, scored: mIoU and pixel accuracy of a dataset of images and masks (METHODS.md §3).

The label maps come from `hf_align.segmentation_inference` (the PAL protocol: patch tokens against the class
profiles, upsampled to the mask size, argmax). Over a dataset one confusion matrix is accumulated; IoU per class skips
classes that are neither in the ground truth nor predicted (mmseg's convention), and pixels labelled `ignore_index`
never count.

Entry points: `evaluate_segmentation` (a dataset of images and masks -> mIoU, pixel accuracy) and the metric helpers
`confusion_matrix` / `segmentation_metrics`. The inference API (`segment_tokens`, `segment_images`,
`overlay_segmentation`, ...) is importable from here too, as it always was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .configuration import TASK_SEGMENTATION
from .evaluation import EvaluationResult
from .segmentation_inference import (
    ImageSegmenter,
    check_segmenter,
    class_profiles,
    image_size,
    overlay_segmentation,
    palette,
    patch_embeddings,
    patch_grid,
    segment_images,
    segment_tokens,
    segmentation_logits,
)

if TYPE_CHECKING:
    from .modeling import AlignerModel
    from .processing import AlignerProcessor


# ---------------------------------------------------------------------------------------------- metrics
def confusion_matrix(
    predictions: torch.Tensor, targets: torch.Tensor, num_classes: int, ignore_index: int | None = 255
) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction, over non-ignored pixels.

    `predictions` and `targets` have the same shape (any). A target outside `[0, num_classes)` that is not
    `ignore_index` is an error (a mask that does not match the class list).
    """
    predictions = torch.as_tensor(predictions).long().flatten()
    targets = torch.as_tensor(targets).long().flatten().to(predictions.device)
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions and targets differ in size: {predictions.numel()} vs {targets.numel()} pixels")
    keep = targets != ignore_index if ignore_index is not None else torch.ones_like(targets, dtype=torch.bool)
    predictions, targets = predictions[keep], targets[keep]
    if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
        bad = sorted(set(targets[(targets < 0) | (targets >= num_classes)].unique().tolist()))[:8]
        raise ValueError(
            f"mask labels {bad} are outside the {num_classes} classes [0, {num_classes}) and are not "
            f"ignore_index={ignore_index}: the class list must follow the mask's label ids"
        )
    if predictions.numel() and (predictions.min() < 0 or predictions.max() >= num_classes):
        raise ValueError(f"predictions must lie in [0, {num_classes})")
    counts = torch.bincount(targets * num_classes + predictions, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes).cpu()


def segmentation_metrics(
    confusion: torch.Tensor, class_names: Sequence[str] | None = None, num_scored: int | None = None
) -> dict:
    """mIoU, pixel accuracy (percent) and per-class IoU from a (C, C) confusion matrix (rows = ground truth).

    IoU_c = TP / (TP + FP + FN); a class with no ground-truth and no predicted pixel is skipped (not counted as 0).
    Only the first `num_scored` classes (default: all) enter the mean and the per-class report; the others (e.g. a
    background prompt) still count as wrong predictions for the pixels they take.
    """
    confusion = torch.as_tensor(confusion, dtype=torch.float64)
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square (C, C) matrix, got {tuple(confusion.shape)}")
    n = confusion.shape[0] if num_scored is None else num_scored
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    total = confusion.sum()
    names = list(class_names) if class_names is not None else [str(c) for c in range(n)]
    per_class = {names[c]: 100.0 * float(true_positive[c] / union[c]) for c in range(n) if union[c] > 0}
    if total == 0:
        raise ValueError("no labelled pixel to score: every mask pixel is ignore_index")
    return {
        "mIoU": float(np.mean(list(per_class.values()))) if per_class else 0.0,
        "pixel_accuracy": 100.0 * float(true_positive.sum() / total),
        "per_class_iou": per_class,
    }


@torch.no_grad()
def evaluate_segmentation(
    model: AlignerModel,
    processor: AlignerProcessor | None,
    dataset,
    class_names: Sequence[str],
    templates: Sequence[str] | None = None,
    image_column: str = "image",
    mask_column: str = "mask",
    ignore_index: int = 255,
    background: str | None = None,
    batch_size: int = 16,
    dataset_name: str | None = None,
    dataset_split: str | None = None,
) -> EvaluationResult:
    """Zero-shot segmentation of a dataset of images and label masks: mIoU and pixel accuracy (percent).

    Args:
        model: an `AlignerModel` with encoders (anchor methods segment by the PAL protocol; see the module doc).
        processor: its `AlignerProcessor` (default: `model.processor`).
        dataset: a `datasets.Dataset` (or list of dicts) with an image column and a mask column: per pixel the index
            of its class in `class_names`, or `ignore_index`. Each mask must have its image's size.
        class_names: class names in label order; `templates` (with a `{}`) default to CLIP's 80 ImageNet prompts.
        background: optional extra prompt (e.g. "background") scored as one more class: pixels it wins are predicted
            "no class" (wrong for every labelled pixel); it gets no IoU and is not in the mean.
        dataset_name / dataset_split: how the model card names the data when the result is recorded (default: what
            a Hub-loaded `dataset` knows about itself).

    Returns:
        An `EvaluationResult`: the dict `mIoU`, `pixel_accuracy`, `per_class_iou` (name -> IoU, classes neither
        labelled nor predicted omitted), `num_images`. Nothing is written into the model: to list the run (mIoU and
        pixel accuracy) on the model card, record it with `model.model_card_data.add_evaluation(result)` (or
        `hf_align.record_evaluation(model, result)`).
    """
    processor = check_segmenter(model, processor)
    if len(dataset) == 0:
        raise ValueError("evaluate_segmentation needs a non-empty dataset")
    column_names = getattr(dataset, "column_names", None) or list(dataset[0])
    for argument, column in (("image_column", image_column), ("mask_column", mask_column)):
        if column not in column_names:
            raise ValueError(f"{argument}={column!r} is not a column of the dataset: {column_names}")
    segmenter = ImageSegmenter(model, processor, class_names, templates, background)
    n_total = segmenter.num_classes
    confusion = torch.zeros(n_total, n_total, dtype=torch.long)
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        images = rows[image_column] if isinstance(rows, dict) else [r[image_column] for r in rows]
        masks = rows[mask_column] if isinstance(rows, dict) else [r[mask_column] for r in rows]
        masks = [torch.as_tensor(np.array(mask)).long() for mask in masks]
        sizes = []
        for offset, (image, mask) in enumerate(zip(images, masks)):
            if mask.dim() == 3 and mask.shape[-1] == 1:
                mask = mask[..., 0]
            if mask.dim() != 2 or tuple(mask.shape) != image_size(image):
                raise ValueError(
                    f"row {start + offset}: mask of shape {tuple(mask.shape)} does not match its image of size "
                    f"{image_size(image)} (height, width): masks must be (H, W) label maps of their image's size"
                )
            sizes.append(tuple(mask.shape))
        predictions = segmenter(images, sizes)
        for prediction, mask in zip(predictions, masks):
            confusion += confusion_matrix(prediction, mask.view(prediction.shape), n_total, ignore_index)
    metrics = segmentation_metrics(confusion, class_names, num_scored=len(class_names))
    metrics["num_images"] = len(dataset)
    return EvaluationResult(
        metrics,
        task=TASK_SEGMENTATION,
        card_metrics={"mIoU": metrics["mIoU"], "pixel_accuracy": metrics["pixel_accuracy"]},
        dataset=dataset,
        dataset_name=dataset_name,
        dataset_split=dataset_split,
        num_samples=len(dataset),
        details=f"{len(class_names)} classes" + (f" + '{background}' prompt" if background else ""),
    )


# The inference names stay importable from here (this module held them before the split).
__all__ = [
    "class_profiles",
    "confusion_matrix",
    "evaluate_segmentation",
    "overlay_segmentation",
    "palette",
    "patch_embeddings",
    "patch_grid",
    "segment_images",
    "segment_tokens",
    "segmentation_logits",
    "segmentation_metrics",
]
