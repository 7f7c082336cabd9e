"""`AlignerProcessor`: the vision encoder's image processor and the text encoder's tokenizer, saved with the aligner.

It also holds the image-size check every path that hands an image to the image processor runs first
(`check_image_size`: extraction, evaluation, the pipelines, segmentation, `AlignerProcessor` itself): a processor that
resizes the shortest edge scales the long side by the same factor, so a 94-byte 4096×1 PNG would become a
917,504×224 image (over 200 million pixels) before the crop. Such an image is refused, with `ImageSizeError`, when
its aspect ratio exceeds `MAX_ASPECT_RATIO` or when the processor's resize would make more than `MAX_RESIZED_PIXELS`.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
from transformers import AutoImageProcessor, AutoTokenizer, BatchEncoding, CLIPImageProcessor, ProcessorMixin
from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
from transformers.image_utils import ChannelDimension, get_image_size, get_image_size_for_max_height_width

from ..encoders.sentence_pipeline import SentencePipelineError, read_sentence_pipeline

# timm's interpolation names -> PIL resampling filters (transformers' `resample`)
_TIMM_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}

# Long side / short side an image may have. Panoramas (up to ~10:1) pass; a shortest-edge resize to 224 px then makes
# at most 4480×224 px. Beyond it an image is a strip the encoders cannot see anyway.
MAX_ASPECT_RATIO = 20
# Pixels the image processor's resize may make of one image (before its crop): 4096² (~200 MB as float32 RGB).
MAX_RESIZED_PIXELS = 4096 * 4096


class ImageSizeError(ValueError):
    """An image whose shape the image processor would blow up: its aspect ratio exceeds `MAX_ASPECT_RATIO`, or the
    processor's resize would make more than `MAX_RESIZED_PIXELS` pixels of it. Extraction treats it as a bad sample
    (`on_bad_sample`)."""


class AlignerProcessor(ProcessorMixin):
    r"""Pairs an image processor and a tokenizer like `CLIPProcessor`, for any two encoders.

    `processor(images=..., text=...)` returns `pixel_values` and `input_ids`/`attention_mask` (+ `token_type_ids`
    when the tokenizer makes them) in one `BatchEncoding`. Saved files are the standard ones, so the stock
    `pipeline("zero-shot-image-classification", model=dir)` finds `preprocessor_config.json` and the tokenizer.
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)

    @classmethod
    def from_encoders(
        cls,
        vision_encoder: str,
        text_encoder: str,
        vision_revision: str | None = None,
        text_revision: str | None = None,
    ) -> AlignerProcessor:
        """The encoders' own image processor and tokenizer, made fit for batched alignment.

        * A timm model's processor (`TimmWrapperImageProcessor`, which transformers never saves) becomes the standard
          processor doing timm's evaluation transform (`timm_image_processor`), so it saves with the aligner.
        * A tokenizer without a pad token (Llama, Mistral style) pads with its end-of-text token; the tokenizer keeps
          its padding side (the encoders read either side, see `hf_align.encoders.outputs.run_text_encoder`).
        * A sentence-transformers repo's tokenizer comes from its Transformer module's folder and truncates at the
          repo's `max_seq_length`, as sentence-transformers does.
        * The tokenizer returns the attention mask (SigLIP's does not by default), which masked pooling needs.
        """
        image_processor = AutoImageProcessor.from_pretrained(vision_encoder, revision=vision_revision)
        if type(image_processor).__name__ == "TimmWrapperImageProcessor":
            image_processor = timm_image_processor(image_processor.data_config)
        try:
            pipeline = read_sentence_pipeline(text_encoder, text_revision)
        except SentencePipelineError:
            pipeline = None  # a pipeline hf_align cannot run: the tokenizer at the repo root is still the right one
        kwargs = {"subfolder": pipeline.transformer_path} if pipeline is not None and pipeline.transformer_path else {}
        tokenizer = AutoTokenizer.from_pretrained(text_encoder, revision=text_revision, **kwargs)
        if pipeline is not None and pipeline.max_seq_length:
            tokenizer.model_max_length = min(tokenizer.model_max_length, pipeline.max_seq_length)
        prepare_tokenizer(tokenizer)
        return cls(image_processor=image_processor, tokenizer=tokenizer)

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding=True, truncation=True, **kwargs):
        if images is None and text is None:
            raise ValueError("AlignerProcessor needs `images`, `text` or both; got neither")
        encoding = {}
        if images is not None:
            for i, image in enumerate(images if isinstance(images, (list, tuple)) else [images]):
                check_image_size(self.image_processor, image, f"images[{i}]")
        if text is not None:
            encoding.update(self.tokenizer(text, return_tensors=return_tensors, padding=padding, truncation=truncation))
        if images is not None:
            encoding.update(self.image_processor(images, return_tensors=return_tensors))
        return BatchEncoding(encoding, tensor_type=return_tensors)


def image_height_width(image) -> tuple[int, int]:
    """(H, W) of a PIL image, or of an array / tensor read as transformers' image processors read it."""
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    return get_image_size(np.asarray(image))


def resized_image_size(image_processor, height: int, width: int) -> tuple[int, int] | None:
    """(H, W) the image processor's resize makes of a `height` x `width` image (before any crop), by transformers' own
    rules for its `size` (those of `TorchvisionBackend.resize`); the image's own size when it does not resize, and
    `None` for a `size` without one of the standard keys (a model-specific resize)."""
    size = getattr(image_processor, "size", None)
    if not getattr(image_processor, "do_resize", False) or size is None:
        return height, width
    setting = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    shortest, longest = setting("shortest_edge"), setting("longest_edge")
    if shortest and longest:
        return tuple(get_size_with_aspect_ratio((height, width), shortest, longest))
    if shortest:
        # A zero-stride stand-in: transformers' helper reads only the shape, and nothing of that size is allocated.
        shape = np.broadcast_to(np.uint8(0), (height, width, 1))
        return tuple(
            get_resize_output_image_size(
                shape, size=shortest, default_to_square=False, input_data_format=ChannelDimension.LAST
            )
        )
    if setting("max_height") and setting("max_width"):
        return tuple(get_image_size_for_max_height_width((height, width), setting("max_height"), setting("max_width")))
    if setting("height") and setting("width"):
        return setting("height"), setting("width")
    return None


def check_image_size(image_processor, image, what: str | None = None) -> None:
    """Raise `ImageSizeError` (naming `what` when given, the image's size and the limit) when `image_processor` would
    blow `image` up: an aspect ratio over `MAX_ASPECT_RATIO`, or a resize to more than `MAX_RESIZED_PIXELS` pixels."""
    height, width = image_height_width(image)
    what = "" if what is None else f"{what}: "
    if min(height, width) < 1:
        raise ImageSizeError(f"{what}empty image ({width}x{height} px)")
    resized = resized_image_size(image_processor, height, width)
    would = "" if resized is None else f"; the image processor would resize it to {resized[1]}x{resized[0]} px"
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageSizeError(
            f"{what}a {width}x{height} px image has an aspect ratio of {ratio:.4g}:1, over the {MAX_ASPECT_RATIO}:1 "
            f"that hf_align.model.processing.MAX_ASPECT_RATIO allows{would}"
        )
    if resized is not None and resized[0] * resized[1] > MAX_RESIZED_PIXELS:
        raise ImageSizeError(
            f"{what}the image processor would resize a {width}x{height} px image to {resized[1]}x{resized[0]} px, "
            f"{resized[0] * resized[1]:,} pixels, over "
            f"hf_align.model.processing.MAX_RESIZED_PIXELS={MAX_RESIZED_PIXELS:,}"
        )


def prepare_tokenizer(tokenizer) -> None:
    """Make a text encoder's tokenizer batch-ready, in place: a pad token and the attention mask.

    Raises:
        ValueError: when the tokenizer has no pad, end-of-text or unknown token to pad with.
    """
    if tokenizer.pad_token is None:
        # Masked poolings never read padding, so any token works; the end-of-text one is what decoder-only
        # embedding models pad with.
        filler = tokenizer.eos_token or tokenizer.unk_token
        if filler is None:
            raise ValueError(
                f"tokenizer of {tokenizer.name_or_path!r} has no pad, end-of-text or unknown token to pad batches with"
            )
        tokenizer.pad_token = filler
    # Masked pooling needs the padding mask; some tokenizers (SigLIP's) do not return it by default, and the stock
    # pipeline would then pool padding as if it were text.
    if "attention_mask" not in tokenizer.model_input_names:
        tokenizer.model_input_names = [*tokenizer.model_input_names, "attention_mask"]


def timm_image_processor(data_config: dict) -> CLIPImageProcessor:
    """timm's evaluation transform as a standard, saveable image processor.

    timm resizes to `floor(size / crop_pct)` (the shorter side for `crop_mode="center"`, both sides for `"squash"`),
    center-crops `size`, scales to [0, 1] and normalises with the model's mean and std. (Where the crop leaves an odd
    margin, transformers' crop starts half a pixel earlier than timm's rounded one: one row or column of difference.)

    Args:
        data_config (`dict`): timm's resolved data config (`input_size`, `interpolation`, `mean`, `std`, `crop_pct`,
            `crop_mode`), as `TimmWrapperImageProcessor.data_config` holds it.

    Raises:
        ValueError: for a crop mode or interpolation with no standard equivalent (`border`, a non-square center crop).
    """
    height, width = data_config["input_size"][-2:]
    crop_pct = data_config.get("crop_pct") or 0.875  # timm's default
    mode = data_config.get("crop_mode") or "center"
    interpolation = data_config.get("interpolation", "bilinear")
    if interpolation not in _TIMM_RESAMPLE:
        raise ValueError(f"timm interpolation {interpolation!r} has no PIL equivalent; known: {sorted(_TIMM_RESAMPLE)}")
    scaled = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    if mode == "squash":
        size = {"height": scaled[0], "width": scaled[1]}
    elif mode == "center" and height == width:
        size = {"shortest_edge": scaled[0]}
    else:
        raise ValueError(
            f"timm crop_mode={mode!r} with input size {height}x{width} has no standard image processor equivalent "
            "(supported: 'squash', and 'center' for square inputs)"
        )
    return CLIPImageProcessor(
        size=size,
        crop_size={"height": height, "width": width},
        resample=_TIMM_RESAMPLE[interpolation],
        image_mean=list(data_config["mean"]),
        image_std=list(data_config["std"]),
    )
