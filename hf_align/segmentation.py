"""Zero-shot semantic segmentation with an aligned model (PAL protocol, METHODS.md §3).

Per image: resize to the encoder's square input, run the frozen vision encoder, take the tapped layer's patch tokens
(CLS and any register tokens dropped), embed every patch against the image anchors (`S_pa = cos(patch, A_v)`, P×K,
not renormalised: the aligner's `embed_patches`), score it against the class profiles (`S_ac`, K×C: each class's
prompts through the text side, i.e. the CAP profiles for `token_relative`, averaged over templates), reshape the P×C
scores to the patch grid, upsample bilinearly to the mask size and take the argmax. Over a dataset one confusion
matrix is accumulated; IoU per class skips classes that are neither in the ground truth nor predicted (mmseg's
convention), and pixels labelled `ignore_index` never count.

Entry points: `evaluate_segmentation` (a dataset of images and masks -> mIoU, pixel accuracy), `segment_tokens`
(precomputed token features -> label maps), `AlignerModel.segment` (images -> label maps, delegates here),
`overlay_segmentation` (a label map drawn over its image), and the metric helpers `confusion_matrix` /
`segmentation_metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .encoders import as_token_sequence


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


# ---------------------------------------------------------------------------------------------- patch grid
def patch_grid(num_tokens: int, num_prefix_tokens: int) -> tuple[int, int]:
    """(h, w) of a square patch grid holding `num_tokens - num_prefix_tokens` patches; a clear error otherwise."""
    patches = num_tokens - num_prefix_tokens
    side = math.isqrt(max(patches, 0))
    if patches <= 0 or side * side != patches:
        raise ValueError(
            f"cannot lay {num_tokens} vision tokens ({num_prefix_tokens} prefix token(s) dropped, {patches} left) on "
            "a square patch grid: give the grid explicitly (grid=(h, w)) or the right num_prefix_tokens"
        )
    return side, side


def _vision_grid(state: torch.Tensor, pixel_values: torch.Tensor, vision_config, has_cls: bool):
    """Patch tokens (B, P, d) and their grid (h, w) from one raw vision hidden state."""
    if state.dim() == 4:  # convolutional stage (B, C, h, w): the grid is the feature map
        return as_token_sequence(state), tuple(state.shape[-2:])
    patch = getattr(vision_config, "patch_size", None)
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    if patch:
        h, w = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
        prefix = state.shape[1] - h * w
        if prefix < 0:
            raise ValueError(
                f"the vision encoder returned {state.shape[1]} tokens, fewer than the {h}x{w} patches its "
                f"patch_size={patch} implies for {tuple(pixel_values.shape[-2:])} inputs"
            )
        return state[:, prefix:], (h, w)
    prefix = 1 if has_cls else 0
    return state[:, prefix:], patch_grid(state.shape[1], prefix)


# ---------------------------------------------------------------------------------------------- scores
def patch_embeddings(model, patch_tokens: torch.Tensor) -> torch.Tensor:
    """(B, P, d_v) patch tokens -> (B, P, D) per-patch embeddings in the space the class profiles live in.

    Anchor methods (`token_relative`, `relative`, `asif`) define `embed_patches` (`cos(patch, A_v)`, not renormalised).
    Pooled projection methods embed each patch as if it were a pooled feature (a MaskCLIP-style baseline). Token
    methods without `embed_patches` cannot segment.
    """
    aligner = model.aligner
    patch_tokens = patch_tokens.to(device=model.logit_scale.device, dtype=model.logit_scale.dtype)
    if hasattr(aligner, "embed_patches"):
        return aligner.embed_patches(patch_tokens)
    if aligner.input_kind == "pooled":
        b, p, d = patch_tokens.shape
        return aligner.embed_image(patch_tokens.reshape(b * p, d)).reshape(b, p, -1)
    raise ValueError(f"method {model.config.method!r} has no per-patch embedding (embed_patches): it cannot segment")


def segmentation_logits(
    model,
    vision_tokens: torch.Tensor,
    class_embeds: torch.Tensor,
    output_size: tuple[int, int] | None = None,
    num_prefix_tokens: int | None = None,
    grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """(B, C, H, W) class scores of token features: `S_pa · S_ac` on the patch grid, bilinearly upsampled.

    Args:
        model: an `AlignerModel` (its aligner embeds the patches).
        vision_tokens: (B, T, d_v) tapped-layer tokens, e.g. a feature cache's `vision_tokens_layer_*` rows.
        class_embeds: (C, D) class profiles (normalised text embeddings of the class prompts).
        output_size: (H, W) to upsample to; default: the patch grid itself.
        num_prefix_tokens: leading non-patch tokens to drop (default 1 when the encoder has a CLS token, else 0).
        grid: (h, w) patch grid; default: the square the patch count makes.
    """
    if vision_tokens.dim() != 3:
        raise ValueError(f"vision_tokens must be (B, T, d) token features, got shape {tuple(vision_tokens.shape)}")
    if class_embeds.dim() != 2:
        raise ValueError(f"class_embeds must be a (C, D) matrix, got shape {tuple(class_embeds.shape)}")
    if num_prefix_tokens is None:
        num_prefix_tokens = 1 if model.config.vision_has_cls else 0
    if grid is None:
        grid = patch_grid(vision_tokens.shape[1], num_prefix_tokens)
    patches = vision_tokens[:, num_prefix_tokens:]
    if patches.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"{patches.shape[1]} patch tokens do not fill a {grid[0]}x{grid[1]} grid")
    return _grid_scores(model, patches, grid, class_embeds, output_size)


def _grid_scores(model, patches, grid, class_embeds, output_size) -> torch.Tensor:
    embeds = patch_embeddings(model, patches)  # (B, P, D)
    if embeds.shape[-1] != class_embeds.shape[-1]:
        raise ValueError(f"class_embeds have width {class_embeds.shape[-1]}, the patch embeddings {embeds.shape[-1]}")
    scores = embeds @ class_embeds.to(embeds).t()  # (B, P, C)
    scores = scores.transpose(1, 2).reshape(scores.shape[0], -1, *grid)
    if output_size is not None and tuple(output_size) != tuple(grid):
        scores = F.interpolate(scores, size=tuple(output_size), mode="bilinear", align_corners=False)
    return scores


def segment_tokens(model, vision_tokens, class_embeds, output_size=None, num_prefix_tokens=None, grid=None):
    """(B, H, W) int64 label maps (argmax of `segmentation_logits`) of precomputed token features."""
    return segmentation_logits(model, vision_tokens, class_embeds, output_size, num_prefix_tokens, grid).argmax(1)


# ---------------------------------------------------------------------------------------------- images
def class_profiles(
    model, processor, class_names: Sequence[str], templates: Sequence[str] | None = None, background: str | None = None
) -> torch.Tensor:
    """(C, D) class profiles `S_ac`ᵀ: each class's prompts through the text side, averaged over templates and
    renormalised; with `background`, one more row for that prompt (e.g. "background")."""
    from .evaluation import class_prototypes

    names = list(class_names) + ([background] if background else [])
    return class_prototypes(model, processor, names, templates)


def _input_size(image_processor) -> tuple[int, int]:
    """(H, W) the processor makes of a square image: the encoder's square input."""
    from PIL import Image

    probe = image_processor(images=[Image.new("RGB", (256, 256))], return_tensors="pt")["pixel_values"]
    return tuple(probe.shape[-2:])


def _square_pixel_values(image_processor, images, size: tuple[int, int]) -> torch.Tensor:
    """Resize every image to the encoder's square input (no crop: every pixel stays in view), then normalise."""
    from PIL import Image

    resized = [_to_pil(image).convert("RGB").resize((size[1], size[0]), Image.BILINEAR) for image in images]
    options = {"do_resize": False}
    if getattr(image_processor, "do_center_crop", None) is not None:
        options["do_center_crop"] = False
    return image_processor(images=resized, return_tensors="pt", **options)["pixel_values"]


def _to_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    return Image.fromarray(array.squeeze())


def _image_hw(image) -> tuple[int, int]:
    if hasattr(image, "size") and not isinstance(image, (np.ndarray, torch.Tensor)):
        width, height = image.size
        return height, width
    return tuple(_to_pil(image).size[::-1])


@torch.no_grad()
def _segment_batch(model, image_processor, images, class_embeds, sizes, input_size) -> list[torch.Tensor]:
    """Label maps for a batch of images, each upsampled to its own (H, W) in `sizes`."""
    pixel_values = _square_pixel_values(image_processor, images, input_size).to(model.device)
    states = model.vision_hidden_states(pixel_values)
    state = states[model.config.absolute_layer("vision")]
    patches, grid = _vision_grid(state, pixel_values, model.vision_model.config, model.config.vision_has_cls)
    scores = _grid_scores(model, patches.float(), grid, class_embeds, None)  # (B, C, h, w)
    return [
        F.interpolate(scores[i : i + 1], size=size, mode="bilinear", align_corners=False)[0].argmax(0).cpu()
        for i, size in enumerate(sizes)
    ]


def _check_segmenter(model, processor):
    if not getattr(model, "has_encoders", False):
        raise ValueError(
            "segmenting images needs the vision encoder: this AlignerModel has none attached (load_encoders=False?); "
            "use hf_align.segmentation.segment_tokens on precomputed token features instead"
        )
    if processor is None:
        raise ValueError("segmentation needs the model's AlignerProcessor (processor=None and model.processor is None)")


@torch.no_grad()
def segment_images(
    model,
    processor,
    images,
    class_names: Sequence[str],
    templates: Sequence[str] | None = None,
    background: str | None = None,
    batch_size: int = 16,
) -> list[torch.Tensor] | torch.Tensor:
    """(H, W) int64 label maps, one per image at the image's own size (one PIL image in: one map out); label c =
    `class_names[c]`, and `len(class_names)` = the background prompt when one is given."""
    from PIL import Image

    processor = processor or getattr(model, "processor", None)
    _check_segmenter(model, processor)
    single = isinstance(images, Image.Image)
    images = [images] if single else list(images)
    if not images:
        raise ValueError("segment needs at least one image")
    model.eval()
    class_embeds = class_profiles(model, processor, class_names, templates, background)
    input_size = _input_size(processor.image_processor)
    maps = []
    for start in range(0, len(images), batch_size):
        batch = list(images[start : start + batch_size])
        sizes = [_image_hw(image) for image in batch]
        maps.extend(_segment_batch(model, processor.image_processor, batch, class_embeds, sizes, input_size))
    return maps[0] if single else maps


@torch.no_grad()
def evaluate_segmentation(
    model,
    processor,
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
) -> dict:
    """Zero-shot segmentation of a dataset of images and label masks: mIoU and pixel accuracy (percent).

    Args:
        model: an `AlignerModel` with encoders (anchor methods segment by the PAL protocol; see the module doc).
        processor: its `AlignerProcessor` (default: `model.processor`).
        dataset: a `datasets.Dataset` (or list of dicts) with an image column and a mask column: per pixel the index
            of its class in `class_names`, or `ignore_index`. Each mask must have its image's size.
        class_names: class names in label order; `templates` (with a `{}`) default to CLIP's 80 ImageNet prompts.
        background: optional extra prompt (e.g. "background") scored as one more class: pixels it wins are predicted
            "no class" (wrong for every labelled pixel); it gets no IoU and is not in the mean.
        dataset_name / dataset_split: how the model card names the data (recorded with the result).

    Returns:
        `mIoU`, `pixel_accuracy`, `per_class_iou` (name -> IoU, classes neither labelled nor predicted omitted),
        `num_images`.
    """
    processor = processor or getattr(model, "processor", None)
    _check_segmenter(model, processor)
    if len(dataset) == 0:
        raise ValueError("evaluate_segmentation needs a non-empty dataset")
    column_names = getattr(dataset, "column_names", None) or list(dataset[0])
    for argument, column in (("image_column", image_column), ("mask_column", mask_column)):
        if column not in column_names:
            raise ValueError(f"{argument}={column!r} is not a column of the dataset: {column_names}")
    model.eval()
    class_embeds = class_profiles(model, processor, class_names, templates, background)
    n_total = len(class_names) + (1 if background else 0)
    input_size = _input_size(processor.image_processor)
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
            if mask.dim() != 2 or tuple(mask.shape) != _image_hw(image):
                raise ValueError(
                    f"row {start + offset}: mask of shape {tuple(mask.shape)} does not match its image of size "
                    f"{_image_hw(image)} (height, width): masks must be (H, W) label maps of their image's size"
                )
            sizes.append(tuple(mask.shape))
        predictions = _segment_batch(model, processor.image_processor, images, class_embeds, sizes, input_size)
        for prediction, mask in zip(predictions, masks):
            confusion += confusion_matrix(prediction, mask.view(prediction.shape), n_total, ignore_index)
    metrics = segmentation_metrics(confusion, class_names, num_scored=len(class_names))
    metrics["num_images"] = len(dataset)
    from .modelcard import TASK_SEGMENTATION, record_evaluation

    record_evaluation(
        model,
        TASK_SEGMENTATION,
        {"mIoU": metrics["mIoU"], "pixel_accuracy": metrics["pixel_accuracy"]},
        dataset,
        dataset_name,
        dataset_split,
        num_samples=len(dataset),
        details=f"{len(class_names)} classes" + (f" + '{background}' prompt" if background else ""),
    )
    return metrics


# ---------------------------------------------------------------------------------------------- drawing
def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, the PASCAL VOC colour map (distinct, stable across runs)."""
    colours = np.zeros((num_classes, 3), dtype=np.uint8)
    for label in range(num_classes):
        value, r, g, b = label, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours[label] = (r, g, b)
    return colours


def overlay_segmentation(image, label_map, alpha: float = 0.5, colours=None, ignore_index: int | None = 255):
    """The label map drawn over its image (PIL RGB): each class in its colour, blended with weight `alpha`.

    `label_map` is (H, W) at the image's size (what `AlignerModel.segment` returns); pixels equal to `ignore_index`
    are left as they are.
    """
    from PIL import Image

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    base = np.asarray(_to_pil(image).convert("RGB"), dtype=np.float32)
    labels = torch.as_tensor(np.asarray(label_map)).long().numpy()
    if labels.shape != base.shape[:2]:
        raise ValueError(f"label_map of shape {labels.shape} does not match the image's (H, W) {base.shape[:2]}")
    keep = labels != ignore_index if ignore_index is not None else np.ones_like(labels, dtype=bool)
    colours = palette(int(labels[keep].max()) + 1 if keep.any() else 1) if colours is None else np.asarray(colours)
    out = base.copy()
    out[keep] = (1 - alpha) * base[keep] + alpha * colours[labels[keep]].astype(np.float32)
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


__all__ = [
    "class_profiles",
    "confusion_matrix",
    "evaluate_segmentation",
    "overlay_segmentation",
    "palette",
    "patch_grid",
    "segment_images",
    "segment_tokens",
    "segmentation_logits",
    "segmentation_metrics",
]
