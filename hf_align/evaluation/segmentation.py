"""Zero-shot semantic segmentation, scored: mIoU and pixel accuracy of a dataset of images and masks
(`docs/methods.md` §6).

The label maps come from `hf_align.model.segmentation` (the PAL protocol: patch tokens against the class
profiles, scored by the model's similarity head, upsampled to the mask size, argmax). Over a dataset one confusion
matrix is accumulated; IoU per class skips classes that are neither in the ground truth nor predicted (mmseg's
convention), and pixels labelled `ignore_index` never count.

**Dataset presets** (`evaluate_segmentation(..., preset=...)`, `SEGMENTATION_PRESETS`) fix the prompts, the mask
labels and which classes enter the mean, each by its background rule:

* `voc20` / `voc21` (PASCAL VOC 2012, masks 0 = background, 1..20, 255 = ignore): "background" is prompt 0 and
  competes in the argmax; background pixels count (one predicted as "cat" is a false positive of "cat"). `voc20`
  leaves the background IoU out of the mean (PAL's VOC20), `voc21` keeps it.
* `context59` / `context60` (Pascal Context reduced to its 59 classes, masks 0 = background, i.e. every other Context
  label, 1..59 in the order of `CONTEXT59_CLASSES`, 255 = ignore): the same rule; `context59` is PAL's Context figure.
* `ade150` (ADE20K SceneParsing, raw masks 0 = unlabelled, 1..150): the 150 classes only, label − 1, unlabelled
  pixels ignored: the usual ADE-150 protocol. **Not comparable with PAL's ADE20K figure (13.8)**, which
  `pal_ade_protocol=True` reproduces: a dummy "background" prompt at index 0 competes for pixels next to the 150
  classes at their raw ids, unlabelled pixels are ignored, and every valid class enters the mean, the background one
  included; it has no ground-truth pixel, so its IoU is 0 as soon as it wins a labelled pixel (and skipped if it
  wins none).

VOC's and Context's prompts follow PAL's readable rewrites ("dining table", "potted plant", "tv monitor"); the
Context and ADE class lists are the benchmarks' standard ones (the 59-class and 150-class label orders).

Entry points: `evaluate_segmentation` (a dataset of images and masks -> mIoU, pixel accuracy) and the metric helpers
`confusion_matrix` / `segmentation_metrics`. The inference API (`segment_tokens`, `segment_images`,
`overlay_segmentation`, ...) is importable from here too, as it always was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..model.configuration import TASK_SEGMENTATION
from ..model.segmentation import (
    ImageSegmenter,
    check_segmenter,
    class_profiles,
    image_size,
    overlay_segmentation,
    palette,
    patch_class_scores,
    patch_embeddings,
    patch_grid,
    segment_images,
    segment_tokens,
    segmentation_logits,
)
from ..utils.cpu_threads import scoped_cpu_threads
from .zero_shot_retrieval import EvaluationResult

if TYPE_CHECKING:
    from ..model.modeling import AlignerModel
    from ..model.processing import AlignerProcessor


# ---------------------------------------------------------------------------------------------- presets
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining table", "dog",
    "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor",
)  # fmt: skip
# Mask labels 1..59 of Pascal Context's 59-class reduction, in order.
CONTEXT59_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building", "bus",
    "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog", "door", "fence",
    "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse",
    "person", "plate", "platform", "potted plant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky",
    "snow", "sofa", "table", "track", "train", "tree", "truck", "tv monitor", "wall", "water", "window", "wood",
)  # fmt: skip
# Raw mask labels 1..150 of ADE20K SceneParsing (ADEChallengeData2016), in order; 0 is "unlabelled".
ADE150_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
BACKGROUND = "background"


@dataclass(frozen=True)
class SegmentationPreset:
    """How one benchmark is scored: prompts, mask labels, ignored pixels and the classes in the mean.

    Attributes:
        name: the preset's name (`voc20`, ..., `ade150`, `ade150_pal`).
        class_names: one prompt per predicted label, in label order (index c = label c); all compete in the argmax.
        ignore_index: the raw mask value that never counts.
        label_offset: subtracted from every other raw mask label to give its class index (ADE-150: 1).
        mean_excludes: class indices that are predicted and counted (their pixels are true or false positives and
            negatives of the others) and get an IoU in `per_class_iou`, but stay out of the mean.
        background_rule: the rule in words (the result's `details` line and the model card quote it).
    """

    name: str
    class_names: tuple[str, ...]
    ignore_index: int
    label_offset: int
    mean_excludes: tuple[int, ...]
    background_rule: str

    def scored_labels(self, mask: torch.Tensor) -> torch.Tensor:
        """(H, W) raw mask -> class indices in [0, len(class_names)), ignored pixels -1. A label that is neither
        ignored nor one of the preset's classes is a `ValueError` (masks of another benchmark or conversion)."""
        mask = torch.as_tensor(mask).long()
        ignored = mask == self.ignore_index
        labels = mask - self.label_offset
        bad = ~ignored & ((labels < 0) | (labels >= len(self.class_names)))
        if bad.any():
            first, last = self.label_offset, self.label_offset + len(self.class_names) - 1
            raise ValueError(
                f"mask labels {sorted(mask[bad].unique().tolist())[:8]} are not labels of preset {self.name!r}: it "
                f"reads classes {first}..{last} and ignores {self.ignore_index}"
            )
        return torch.where(ignored, torch.full_like(mask, -1), labels)

    def confusion(self, prediction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(C, C) confusion counts of one predicted label map against its raw benchmark mask (same shape)."""
        return confusion_matrix(prediction, self.scored_labels(mask), len(self.class_names), ignore_index=-1)

    def metrics(self, confusion: torch.Tensor) -> dict:
        """`segmentation_metrics` of a summed confusion matrix under this preset's rule for the mean."""
        return segmentation_metrics(confusion, self.class_names, mean_excludes=self.mean_excludes)


_PAL_BACKGROUND = (
    'a "background" prompt (label 0) competes in the argmax and background pixels count, its IoU {}; 255 ignored'
)
SEGMENTATION_PRESETS = {
    "voc20": SegmentationPreset(
        "voc20", (BACKGROUND, *VOC_CLASSES), 255, 0, (0,), _PAL_BACKGROUND.format("left out of the mean (PAL's VOC20)")
    ),
    "voc21": SegmentationPreset("voc21", (BACKGROUND, *VOC_CLASSES), 255, 0, (), _PAL_BACKGROUND.format("in the mean")),
    "context59": SegmentationPreset(
        "context59",
        (BACKGROUND, *CONTEXT59_CLASSES),
        255,
        0,
        (0,),
        _PAL_BACKGROUND.format("left out of the mean (PAL's Context)"),
    ),
    "context60": SegmentationPreset(
        "context60", (BACKGROUND, *CONTEXT59_CLASSES), 255, 0, (), _PAL_BACKGROUND.format("in the mean")
    ),
    "ade150": SegmentationPreset(
        "ade150",
        ADE150_CLASSES,
        0,
        1,
        (),
        "the 150 classes only, unlabelled pixels (0) ignored; not comparable with PAL's ADE20K figure",
    ),
}
# `preset="ade150", pal_ade_protocol=True`
PAL_ADE20K_PRESET = SegmentationPreset(
    "ade150_pal",
    (BACKGROUND, *ADE150_CLASSES),
    0,
    0,
    (),
    'PAL\'s ADE20K protocol: a dummy "background" prompt (label 0) competes in the argmax, unlabelled pixels ignored, '
    "and its IoU (0 once it wins a pixel) enters the mean",
)


def segmentation_preset(name: str, pal_ade_protocol: bool = False) -> SegmentationPreset:
    """The preset `name` (`voc20`, `voc21`, `context59`, `context60`, `ade150`); with `pal_ade_protocol=True` (ADE
    only) PAL's ADE20K protocol. `ValueError` naming the presets for an unknown name."""
    if name not in SEGMENTATION_PRESETS:
        raise ValueError(f"preset must be one of {sorted(SEGMENTATION_PRESETS)}, got {name!r}")
    if pal_ade_protocol and name != "ade150":
        raise ValueError(
            f"pal_ade_protocol=True reproduces PAL's ADE20K protocol: it needs preset='ade150', got {name!r}"
        )
    return PAL_ADE20K_PRESET if pal_ade_protocol else SEGMENTATION_PRESETS[name]


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
    confusion: torch.Tensor,
    class_names: Sequence[str] | None = None,
    num_scored: int | None = None,
    mean_excludes: Sequence[int] = (),
) -> dict:
    """mIoU, pixel accuracy (percent) and per-class IoU from a (C, C) confusion matrix (rows = ground truth).

    IoU_c = TP / (TP + FP + FN); a class with no ground-truth and no predicted pixel is skipped (not counted as 0).
    Only the first `num_scored` classes (default: all) enter the mean and the per-class report; the others (e.g. a
    background prompt) still count as wrong predictions for the pixels they take. Classes in `mean_excludes` (e.g.
    VOC-20's background) are reported in `per_class_iou` but left out of the mean.
    """
    confusion = torch.as_tensor(confusion, dtype=torch.float64)
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square (C, C) matrix, got {tuple(confusion.shape)}")
    n = confusion.shape[0] if num_scored is None else num_scored
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    total = confusion.sum()
    names = list(class_names) if class_names is not None else [str(c) for c in range(n)]
    bad = [c for c in mean_excludes if not (isinstance(c, int) and 0 <= c < n)]
    if bad:
        raise ValueError(f"mean_excludes must hold class indices in [0, {n}), got {list(mean_excludes)}")
    iou = {c: 100.0 * float(true_positive[c] / union[c]) for c in range(n) if union[c] > 0}
    per_class = {names[c]: value for c, value in iou.items()}
    in_mean = [value for c, value in iou.items() if c not in mean_excludes]
    if total == 0:
        raise ValueError("no labelled pixel to score: every mask pixel is ignore_index")
    return {
        "mIoU": float(np.mean(in_mean)) if in_mean else 0.0,
        "pixel_accuracy": 100.0 * float(true_positive.sum() / total),
        "per_class_iou": per_class,
    }


@scoped_cpu_threads
@torch.no_grad()
def evaluate_segmentation(
    model: AlignerModel,
    processor: AlignerProcessor | None,
    dataset,
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    image_column: str = "image",
    mask_column: str = "mask",
    ignore_index: int | None = None,
    background: str | None = None,
    batch_size: int = 16,
    dataset_name: str | None = None,
    dataset_split: str | None = None,
    preset: str | None = None,
    pal_ade_protocol: bool = False,
) -> EvaluationResult:
    """Zero-shot segmentation of a dataset of images and label masks: mIoU and pixel accuracy (percent).

    Args:
        model: an `AlignerModel` with encoders (anchor methods segment by the PAL protocol; see the module doc).
        processor: its `AlignerProcessor` (default: `model.processor`).
        dataset: a `datasets.Dataset` (or list of dicts) with an image column and a mask column: per pixel the index
            of its class in `class_names`, or `ignore_index` (with a preset: the benchmark's own labels). Each mask
            must have its image's size.
        class_names: class names in label order (without a preset); `templates` (with a `{}`) default to CLIP's 80
            ImageNet prompts.
        ignore_index: the mask value that never counts (without a preset; default 255).
        background: optional extra prompt (e.g. "background") scored as one more class, without a preset: pixels it
            wins are predicted "no class" (wrong for every labelled pixel); it gets no IoU and is not in the mean.
        dataset_name: how the model card names the data when the result is recorded (default: what a Hub-loaded
            `dataset` knows about itself).
        dataset_split: how the model card names the split, likewise.
        preset: `voc20`, `voc21`, `context59`, `context60` or `ade150`: the benchmark's prompts, mask labels,
            ignored value and background rule (see the module docstring); replaces `class_names`, `ignore_index` and
            `background`.
        pal_ade_protocol: with `preset="ade150"`, PAL's ADE20K protocol (a dummy background prompt whose IoU of 0
            enters the mean). The default `ade150` figure is **not comparable** with PAL's ADE20K figure.

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
    rule = None
    if preset is not None:
        chosen = (("class_names", class_names), ("ignore_index", ignore_index), ("background", background))
        given = [name for name, value in chosen if value is not None]
        if given:
            raise ValueError(
                f"preset={preset!r} sets the prompts, the mask labels and the ignored value: do not also give {given}"
            )
        rule = segmentation_preset(preset, pal_ade_protocol)
        class_names = rule.class_names
    elif pal_ade_protocol:
        raise ValueError("pal_ade_protocol=True reproduces PAL's ADE20K protocol: it needs preset='ade150'")
    elif class_names is None:
        raise ValueError("give class_names (the class of each mask label, in label order) or a preset")
    ignore_index = 255 if ignore_index is None else ignore_index
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
            mask = mask.view(prediction.shape)
            if rule is not None:
                confusion += rule.confusion(prediction, mask)
            else:
                confusion += confusion_matrix(prediction, mask, n_total, ignore_index)
    if rule is not None:
        metrics = rule.metrics(confusion)
        details = f"preset `{rule.name}`: {rule.background_rule}"
    else:
        metrics = segmentation_metrics(confusion, class_names, num_scored=len(class_names))
        details = f"{len(class_names)} classes" + (f" + '{background}' prompt" if background else "")
    metrics["num_images"] = len(dataset)
    return EvaluationResult(
        metrics,
        task=TASK_SEGMENTATION,
        card_metrics={"mIoU": metrics["mIoU"], "pixel_accuracy": metrics["pixel_accuracy"]},
        dataset=dataset,
        dataset_name=dataset_name,
        dataset_split=dataset_split,
        num_samples=len(dataset),
        details=details,
    )


# The inference names stay importable from here (this module held them before the split).
__all__ = [
    "ADE150_CLASSES",
    "CONTEXT59_CLASSES",
    "PAL_ADE20K_PRESET",
    "SEGMENTATION_PRESETS",
    "VOC_CLASSES",
    "SegmentationPreset",
    "class_profiles",
    "confusion_matrix",
    "evaluate_segmentation",
    "overlay_segmentation",
    "palette",
    "patch_class_scores",
    "patch_embeddings",
    "patch_grid",
    "segment_images",
    "segment_tokens",
    "segmentation_logits",
    "segmentation_metrics",
    "segmentation_preset",
]
