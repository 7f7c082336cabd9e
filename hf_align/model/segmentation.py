"""Zero-shot semantic segmentation inference: token maps -> label maps (PAL protocol, `docs/methods.md` §6).

Per image: resize to the encoder's square input (bicubic, no crop, as PAL), run the frozen vision encoder, take the
tapped layer's patch tokens (CLS and any register tokens dropped), embed every patch against the image anchors
(`S_pa = cos(patch, A_v)`, P×K, not renormalised: the aligner's `embed_patches`), score it against the class profiles
(`S_ac`, K×C: each class's prompts through the text side, i.e. the CAP profiles for `token_relative`, averaged over
templates) with the model's similarity head (`patch_class_scores`: the plain product `S_pa · S_ac` for the `cosine` and
`dot` heads, as PAL; any other head scores the renormalised patch embeddings as it scores pooled ones), reshape the
P×C scores to the patch grid, upsample bilinearly to the mask size and take the argmax.

Entry points: `segment_tokens` (precomputed token features -> label maps), `segment_images` (images -> label maps;
what `AlignerModel.segment` calls) and `overlay_segmentation` (a label map drawn over its image). Scoring a dataset
against ground-truth masks (mIoU) is `hf_align.evaluation.segmentation.evaluate_segmentation`.

This module sits below the model: it reads what it needs off the `AlignerModel` it is given (aligner, config, vision
tower) and imports neither the model, the evaluation nor the model card.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..encoders.poolings import as_token_sequence
from .processing import check_image_size
from .templates import class_prototypes

if TYPE_CHECKING:
    from .modeling import AlignerModel
    from .processing import AlignerProcessor


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


def _vision_grid(state: torch.Tensor, pixel_values: torch.Tensor, vision_config, num_prefix_tokens: int):
    """Patch tokens (B, P, d) and their grid (h, w) from one raw vision sequence (or feature map); without a patch
    size, its first `num_prefix_tokens` tokens are the non-patch ones."""
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
    return state[:, num_prefix_tokens:], patch_grid(state.shape[1], num_prefix_tokens)


# ---------------------------------------------------------------------------------------------- scores
def patch_embeddings(model: AlignerModel, patch_tokens: torch.Tensor) -> torch.Tensor:
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
    model: AlignerModel,
    vision_tokens: torch.Tensor,
    class_embeds: torch.Tensor,
    output_size: tuple[int, int] | None = None,
    num_prefix_tokens: int | None = None,
    grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """(B, C, H, W) class scores of token features (`patch_class_scores`) on the patch grid, bilinearly upsampled.

    Args:
        model: an `AlignerModel` (its aligner embeds the patches).
        vision_tokens: (B, T, d_v) tapped-layer tokens, e.g. a feature cache's `vision_tokens_layer_*` rows.
        class_embeds: (C, D) class profiles (normalised text embeddings of the class prompts).
        output_size: (H, W) to upsample to; default: the patch grid itself.
        num_prefix_tokens: leading non-patch tokens to drop (default: the CLS / register tokens of the tapped
            sequence, `model.config.num_prefix_tokens("vision")`).
        grid: (h, w) patch grid; default: the square the patch count makes.
    """
    if vision_tokens.dim() != 3:
        raise ValueError(f"vision_tokens must be (B, T, d) token features, got shape {tuple(vision_tokens.shape)}")
    if class_embeds.dim() != 2:
        raise ValueError(f"class_embeds must be a (C, D) matrix, got shape {tuple(class_embeds.shape)}")
    if num_prefix_tokens is None:
        num_prefix_tokens = model.config.num_prefix_tokens("vision")
    if grid is None:
        grid = patch_grid(vision_tokens.shape[1], num_prefix_tokens)
    patches = vision_tokens[:, num_prefix_tokens:]
    if patches.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"{patches.shape[1]} patch tokens do not fill a {grid[0]}x{grid[1]} grid")
    return _grid_scores(model, patches, grid, class_embeds, output_size)


def _grid_scores(model, patches, grid, class_embeds, output_size) -> torch.Tensor:
    scores = patch_class_scores(model, patch_embeddings(model, patches), class_embeds)  # (B, P, C)
    scores = scores.transpose(1, 2).reshape(scores.shape[0], -1, *grid)
    if output_size is not None and tuple(output_size) != tuple(grid):
        scores = F.interpolate(scores, size=tuple(output_size), mode="bilinear", align_corners=False)
    return scores


def patch_class_scores(model: AlignerModel, embeds: torch.Tensor, class_embeds: torch.Tensor) -> torch.Tensor:
    """(B, P, D) patch embeddings, (C, D) class profiles -> (B, P, C) scores by the model's similarity head.

    A head whose unit-norm score is the plain product (`inner_product`: `cosine`, `dot`) gets PAL's `S_pa · S_ac` on
    the patch embeddings as they are (a patch's length scales its row of scores, never its ranking). Any other head
    scores what the model feeds it everywhere else, unit-norm embeddings: each patch embedding renormalised, then
    `model.similarity.score_unit_norm`, the function the model's forward makes logits with.
    """
    if embeds.shape[-1] != class_embeds.shape[-1]:
        raise ValueError(f"class_embeds have width {class_embeds.shape[-1]}, the patch embeddings {embeds.shape[-1]}")
    head = model.similarity
    class_embeds = class_embeds.to(embeds)
    if getattr(head, "inner_product", False):  # a head registered as a bare nn.Module does not say: the general path
        return embeds @ class_embeds.t()
    flat = F.normalize(embeds.reshape(-1, embeds.shape[-1]), dim=-1)
    return head.score_unit_norm(flat, class_embeds).reshape(*embeds.shape[:-1], class_embeds.shape[0])


def segment_tokens(
    model: AlignerModel,
    vision_tokens: torch.Tensor,
    class_embeds: torch.Tensor,
    output_size: tuple[int, int] | None = None,
    num_prefix_tokens: int | None = None,
    grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """(B, H, W) int64 label maps (argmax of `segmentation_logits`, same arguments) of precomputed token features."""
    return segmentation_logits(model, vision_tokens, class_embeds, output_size, num_prefix_tokens, grid).argmax(1)


# ---------------------------------------------------------------------------------------------- images
def class_profiles(
    model: AlignerModel,
    processor: AlignerProcessor,
    class_names: Sequence[str],
    templates: Sequence[str] | None = None,
    background: str | None = None,
) -> torch.Tensor:
    """(C, D) class profiles `S_ac`ᵀ: each class's prompts through the text side, averaged over templates and
    renormalised; with `background`, one more row for that prompt (e.g. "background")."""
    names = list(class_names) + ([background] if background else [])
    return class_prototypes(model, processor, names, templates)


def _input_size(image_processor) -> tuple[int, int]:
    """(H, W) the processor makes of a square image: the encoder's square input."""
    from PIL import Image

    probe = image_processor(images=[Image.new("RGB", (256, 256))], return_tensors="pt")["pixel_values"]
    return tuple(probe.shape[-2:])


def _square_pixel_values(image_processor, images, size: tuple[int, int]) -> torch.Tensor:
    """Resize every image to the encoder's square input, bicubic as PAL does (no crop: every pixel stays in view),
    then normalise."""
    from PIL import Image

    resized = [_to_pil(image).convert("RGB").resize((size[1], size[0]), Image.BICUBIC) for image in images]
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


def image_size(image) -> tuple[int, int]:
    """(H, W) of a PIL image, or of an (H, W[, C]) / (C, H, W) array or tensor."""
    if hasattr(image, "size") and not isinstance(image, (np.ndarray, torch.Tensor)):
        width, height = image.size
        return height, width
    return tuple(_to_pil(image).size[::-1])


def check_segmenter(model: AlignerModel, processor: AlignerProcessor | None) -> AlignerProcessor:
    """The processor to segment images with (`processor`, else `model.processor`); a clear error when the model has
    no vision encoder or there is no processor."""
    processor = processor or getattr(model, "processor", None)
    if not getattr(model, "has_encoders", False):
        raise ValueError(
            "segmenting images needs the vision encoder: this AlignerModel has none attached (load_encoders=False?); "
            "use hf_align.evaluation.segmentation.segment_tokens on precomputed token features instead"
        )
    if processor is None:
        raise ValueError("segmentation needs the model's AlignerProcessor (processor=None and model.processor is None)")
    return processor


class ImageSegmenter:
    """Label maps of images for one class list: the class profiles (text tower) and the encoder's square input size
    are computed once, then each call runs the vision tower on one batch of images.

    Args:
        model: an `AlignerModel` with its vision encoder (see `check_segmenter`); put in eval mode.
        processor: its `AlignerProcessor`.
        class_names: class names in label order; `templates` (with a `{}`) default to CLIP's 80 ImageNet prompts.
        background: optional extra prompt (e.g. "background"), label `len(class_names)`.

    Attributes:
        num_classes: `len(class_names)`, plus one with a background prompt.
    """

    def __init__(
        self,
        model: AlignerModel,
        processor: AlignerProcessor,
        class_names: Sequence[str],
        templates: Sequence[str] | None = None,
        background: str | None = None,
    ):
        model.eval()
        self.model = model
        self.image_processor = processor.image_processor
        self.class_embeds = class_profiles(model, processor, class_names, templates, background)  # (C, D)
        self.num_classes = self.class_embeds.shape[0]
        self.input_size = _input_size(self.image_processor)

    @torch.no_grad()
    def __call__(self, images: Sequence, sizes: Sequence[tuple[int, int]] | None = None) -> list[torch.Tensor]:
        """One (H, W) int64 label map per image, upsampled to its entry of `sizes` (default: the image's own size)."""
        model = self.model
        # The gate every image path shares: the square resize below cannot blow a strip up, but its label map and
        # patch grid would be meaningless, and the rule stays one rule.
        for i, image in enumerate(images):
            check_image_size(self.image_processor, image, f"images[{i}]")
        sizes = [image_size(image) for image in images] if sizes is None else sizes
        pixel_values = _square_pixel_values(self.image_processor, images, self.input_size).to(model.device)
        state = model.vision_token_state(pixel_values)  # the sequence the vision tap reads its tokens from
        prefix = model.config.num_prefix_tokens("vision")
        patches, grid = _vision_grid(state, pixel_values, model.vision_model.config, prefix)
        scores = _grid_scores(model, patches.float(), grid, self.class_embeds, None)  # (B, C, h, w)
        return [
            F.interpolate(scores[i : i + 1], size=size, mode="bilinear", align_corners=False)[0].argmax(0).cpu()
            for i, size in enumerate(sizes)
        ]


@torch.no_grad()
def segment_images(
    model: AlignerModel,
    processor: AlignerProcessor | None,
    images,
    class_names: Sequence[str],
    templates: Sequence[str] | None = None,
    background: str | None = None,
    batch_size: int = 16,
) -> list[torch.Tensor] | torch.Tensor:
    """(H, W) int64 label maps, one per image at the image's own size (one PIL image in: one map out); label c =
    `class_names[c]`, and `len(class_names)` = the background prompt when one is given. `processor` defaults to
    `model.processor`."""
    from PIL import Image

    processor = check_segmenter(model, processor)
    single = isinstance(images, Image.Image)
    images = [images] if single else list(images)
    if not images:
        raise ValueError("segment needs at least one image")
    segmenter = ImageSegmenter(model, processor, class_names, templates, background)
    maps = []
    for start in range(0, len(images), batch_size):
        maps.extend(segmenter(list(images[start : start + batch_size])))
    return maps[0] if single else maps


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
    "ImageSegmenter",
    "check_segmenter",
    "class_profiles",
    "image_size",
    "overlay_segmentation",
    "palette",
    "patch_class_scores",
    "patch_embeddings",
    "patch_grid",
    "segment_images",
    "segment_tokens",
    "segmentation_logits",
]
