"""The source side of an extraction: loading a dataset split, decoding its images and captions, and preprocessing
batches of them (the CPU work `extract_features` runs in DataLoader workers while the encoders run).

Images are decoded one by one and converted to RGB: grayscale, palette, CMYK, 16-bit and float images are rescaled;
transparency is composited on white as CLIP's processor does; sides over `MAX_IMAGE_SIDE` are box-downsampled first.
Captions over the text encoder's length limit are truncated with a warning. What cannot be encoded (an undecodable or
empty image, one the image processor would blow up (`hf_align.model.processing.check_image_size`: a 4096×1 strip), a
missing / empty / non-text / non-UTF-8 caption, or one that UTF-8 cannot encode (a lone surrogate such as "\ud800",
which a Python-level stream or transform can yield)) is reported with its row and reason, for `extract_features`'
bad-sample policy to raise or skip.
"""

from __future__ import annotations

import io
import math
import os
from typing import TYPE_CHECKING

import datasets
import numpy as np
import torch
from transformers.utils import logging

from ..model.processing import check_image_size

if TYPE_CHECKING:
    from .encode import ExtractionPlan

logger = logging.get_logger(__name__)

__all__ = ["MAX_IMAGE_SIDE", "load_dataset_split"]


MAX_IMAGE_SIDE = 4096  # larger images are box-downsampled before the image processor (which resizes them anyway)
_HIGH_DEPTH_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")


# ---------------------------------------------------------------------------------------------- the dataset
def load_dataset_split(
    name: str, config: str | None = None, split: str = "train", max_samples: int | None = None, seed: int = 0
) -> datasets.Dataset:
    """A `datasets.Dataset` from a `save_to_disk` folder or through `datasets.load_dataset`."""
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "state.json")):
        data = datasets.load_from_disk(name)
    elif os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_dict.json")):
        data = datasets.load_from_disk(name)[split]
    else:
        data = datasets.load_dataset(name, config, split=split)
    if max_samples is not None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        data = data.shuffle(seed=seed).select(range(min(max_samples, len(data))))
    return data


class SourceBatches(torch.utils.data.Dataset):
    """Item i: `(start, dataset[start : start + batch_size])` for the i-th batch index of `batches`."""

    def __init__(self, dataset: datasets.Dataset, batch_size: int, batches: range):
        self.dataset, self.batch_size, self.batches = dataset, batch_size, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        start = self.batches[i] * self.batch_size
        return start, self.dataset[start : start + self.batch_size]


class Preprocessor:
    """The DataLoader's collate function: `prepare_batch` with this extraction's processor and plan."""

    def __init__(self, processor, plan: ExtractionPlan):
        self.processor, self.plan = processor, plan

    def __call__(self, item) -> dict:
        start, batch = item
        return prepare_batch(self.processor, self.plan, start, batch)


def prepare_batch(processor, plan: ExtractionPlan, start: int, batch: dict, shard: int | None = None) -> dict:
    """Decode, check and preprocess the source rows `start, start + 1, ...` in `batch` (CPU work, run in a worker);
    `shard`: the source shard they come from in a streamed extraction (rows then count within it), else `None`.

    Returns a dict:
        rejects: `(position in batch, reason, caption index or None)` of each bad sample, in row order; a bad sample
            never reaches the encoders' batch, so it cannot poison the other rows.
        positions: index in `batch` of each usable image; owner: index into those images of each caption;
            caption_ids: index of each caption in its row's list (None for a single caption); keep: the
            `keep_columns` values of each caption.
        pixel_values: (n_images, C, H, W) of the usable images, or None when there is none.
        text_chunks: the captions sorted by token length (stable), tokenized `batch_size` at a time, each chunk padded
            to its own longest; text_order: (n_captions,) caption index of each sorted row.
        truncated: `(row, tokens)` of each caption cut to `plan.text_limit` tokens; n_source: rows in `batch`.
    """
    rejects, images, positions, captions, owner, caption_ids = [], [], [], [], [], []
    for i, (value, caption) in enumerate(zip(batch[plan.image_column], batch[plan.text_column])):
        try:
            image = _rgb_image(value)
            check_image_size(processor.image_processor, image)
        except ValueError as err:
            rejects.append((i, f"{plan.image_column!r}: {err}", None))
            continue
        group = caption if isinstance(caption, list) else [caption]
        if not group:
            rejects.append((i, f"{plan.text_column!r} holds an empty list of captions", None))
            continue
        texts = []
        for k, text in enumerate(group):
            index = k if isinstance(caption, list) else None
            try:
                texts.append((index, _caption_text(text)))
            except ValueError as err:
                rejects.append((i, f"{plan.text_column!r}: {err}", index))
        for index, text in texts:
            captions.append(text)
            owner.append(len(images))
            caption_ids.append(index)
        if texts:
            images.append(image)
            positions.append(i)
    prepared = {
        "start": start,
        "shard": shard,
        "n_source": len(batch[plan.image_column]),
        "rejects": rejects,
        "positions": positions,
        "owner": owner,
        "caption_ids": caption_ids,
        "keep": {name: [batch[name][positions[o]] for o in owner] for name in plan.keep_columns},
        "pixel_values": None,
        "text_chunks": [],
        "text_order": None,
        "truncated": [],
    }
    if not images:
        return prepared
    tokenizer = processor.tokenizer
    prepared["truncated"] = _truncated_captions(
        tokenizer, captions, [start + positions[o] for o in owner], plan.text_limit
    )
    prepared["pixel_values"] = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    ids = tokenizer(captions, truncation=True, max_length=plan.text_limit, return_attention_mask=False)["input_ids"]
    order = sorted(range(len(captions)), key=lambda c: len(ids[c]))
    for s in range(0, len(order), plan.batch_size):
        chunk = [captions[c] for c in order[s : s + plan.batch_size]]
        inputs = tokenizer(chunk, padding=True, truncation=True, max_length=plan.text_limit, return_tensors="pt")
        prepared["text_chunks"].append(dict(inputs))
    prepared["text_order"] = torch.tensor(order)
    return prepared


# ---------------------------------------------------------------------------------------------- images
def _rgb_image(value):
    """Whatever an image column holds, as an RGB PIL image; `ValueError` says why it cannot be one.

    Accepts PIL images, `datasets.Image(decode=False)` dicts, encoded bytes, file paths and HWC/HW arrays.
    """
    from PIL import Image
    from transformers.image_transforms import convert_to_rgb

    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = value.get("bytes") or value.get("path")
    if value is None:
        raise ValueError("no image (None)")
    if isinstance(value, (bytes, bytearray, str, os.PathLike)):
        image = _decode_image(value)
    elif isinstance(value, Image.Image):
        image = _decode_image(value)  # a lazily opened file is only read (and found corrupt) on load()
    elif isinstance(value, np.ndarray):
        try:
            image = Image.fromarray(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"an array of shape {value.shape} and dtype {value.dtype} is not an image: {err}") from err
    else:
        raise ValueError(f"unsupported type {type(value).__name__}; give PIL images, encoded bytes or file paths")
    if min(image.size) < 1:
        raise ValueError(f"empty image ({image.size[0]}x{image.size[1]} px)")
    if image.mode in _HIGH_DEPTH_MODES:
        image = _to_8bit(image)
    if max(image.size) > MAX_IMAGE_SIDE:
        if image.mode in ("1", "P"):  # modes Image.reduce does not take
            image = Image.fromarray(convert_to_rgb(image, return_numpy=True))
        image = image.reduce(math.ceil(max(image.size) / MAX_IMAGE_SIDE))
    try:
        # transformers' helper: transparency is composited on white, as CLIP's image processor does
        return Image.fromarray(convert_to_rgb(image, return_numpy=True))
    except (ValueError, OSError) as err:
        raise ValueError(f"mode {image.mode!r} cannot be converted to RGB: {err}") from err


def _decode_image(source):
    from PIL import Image

    try:
        if isinstance(source, Image.Image):
            image = source
        else:
            image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
            image.draft(None, (MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))  # JPEG only: decode huge photos at 1/2 .. 1/8 scale
        image.load()
    except Exception as err:  # decoders raise OSError, SyntaxError, EOFError, struct.error, ... on corrupt data
        raise ValueError(f"cannot be decoded as an image ({type(err).__name__}: {err})") from err
    return image


def _to_8bit(image):
    """A 16-bit, 32-bit integer or float image as 8-bit grayscale, scaled by its nominal range (not its own max,
    so a dark 16-bit image stays dark): 65535 for 16-bit modes; 1, 255 or 65535 (the smallest that holds the
    values) for "F" and "I"."""
    from PIL import Image

    pixels = np.nan_to_num(np.asarray(image, dtype=np.float32))
    if image.mode.startswith("I;16"):
        top = 65535.0
    else:
        peak = float(pixels.max())
        candidates = (1.0 if image.mode == "F" else 255.0, 255.0, 65535.0, max(peak, 1.0))
        top = next(t for t in candidates if peak <= t)
    return Image.fromarray(np.clip(pixels * (255.0 / top) + 0.5, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------- captions
def _caption_text(value) -> str:
    """A caption as text; `ValueError` for None, non-text, bytes that are not UTF-8, text that UTF-8 cannot encode
    (lone surrogates), or an empty caption."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            bad = bytes(value[err.start : err.start + 4])
            raise ValueError(f"the caption bytes are not valid UTF-8 (at byte {err.start}: {bad!r})") from err
    if value is None:
        raise ValueError("missing caption (None)")
    if not isinstance(value, str):
        raise ValueError(f"a caption must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # lone surrogates: the tokenizer and Arrow would both fail on the whole batch
        raise ValueError(
            f"the caption cannot be encoded as UTF-8 ({err.reason}: {value[err.start : err.end]!r} at character "
            f"{err.start})"
        ) from err
    if not value.strip():
        raise ValueError("empty caption")
    return value


def _truncated_captions(tokenizer, captions: list[str], rows: list[int], limit: int) -> list[tuple[int, int]]:
    """`(row, tokens)` of the captions longer than `limit` tokens."""
    # A token spans at least one UTF-8 byte (plus a few special / word-start tokens), so only captions about this
    # long can be cut: count just those without truncation.
    long = [i for i, text in enumerate(captions) if len(text.encode("utf-8")) + 8 > limit]
    if not long:
        return []
    lengths = [len(ids) for ids in tokenizer([captions[i] for i in long], truncation=False, verbose=False)["input_ids"]]
    return [(rows[i], n) for i, n in zip(long, lengths) if n > limit]


def log_truncated(cut: list[tuple[int, int]], limit: int) -> None:
    # Logged by the main process: a worker's log records would not reach the caller's handlers.
    if cut:
        logger.warning(
            f"{len(cut)} caption(s) longer than the text encoder's limit of {limit} tokens were truncated to it: "
            f"rows {[row for row, _ in cut][:20]} (longest: {max(n for _, n in cut)} tokens)"
        )
