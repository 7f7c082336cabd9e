"""An aligner behind open_clip's interface, so tools written for open_clip models (clip_benchmark, ...) run on it.

open_clip's contract is three objects: the model, with `encode_image(images, normalize=False)` and
`encode_text(tokens, normalize=False)` (`AlignerModel` has both); a per-image `preprocess` (PIL image -> (C, H, W)
tensor); and a `tokenizer` (list of strings -> what `encode_text` takes). `create_model_and_transforms` builds the
three from a saved aligner, like clip_benchmark's model loaders do from open_clip:

```python
from hf_align.integrations.open_clip import create_model_and_transforms

model, preprocess, tokenizer = create_model_and_transforms("user/aligner", device="cuda")
image = preprocess(pil_image).unsqueeze(0).to("cuda")                # (1, C, H, W)
text = tokenizer(["a photo of a cat", "a photo of a dog"]).to("cuda")
probs = (100 * model.encode_image(image, normalize=True) @ model.encode_text(text, normalize=True).T).softmax(-1)
```

For clip_benchmark's metric code, which iterates a `torch.utils.data.DataLoader`, `ClassificationDataset` and
`RetrievalDataset` present a `datasets.Dataset` the way its loaders do (`(image, label)` items and a `.classes` list;
`(image, [captions])` items collated by `collate_image_captions`).

open_clip's contract scores by the dot product of the normalised embeddings, as above: that is the aligner's own score
for the `cosine` and `dot` heads only. For any other head (`bilinear`, `mlp`, the distances) clip_benchmark's figures
are not the model's; `hf_align.evaluate_zero_shot` / `evaluate_retrieval` rank with the head itself.

open_clip's own `create_model_and_transforms` returns `(model, preprocess_train, preprocess_val)` and leaves the
tokenizer to `open_clip.get_tokenizer`; an aligner has no training augmentation, so this one returns the evaluation
transform and the tokenizer, the triple clip_benchmark's loaders return. `get_tokenizer` is here too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import datasets
import torch
from transformers import BatchEncoding

from ..model.modeling import AlignerModel
from ..model.processing import AlignerProcessor, check_image_size


class AlignerTokenizer:
    """open_clip-style tokenizer over an aligner's text tokenizer: `tokenizer(texts)` -> what `model.encode_text`
    takes.

    Args:
        tokenizer: the aligner's tokenizer (`AlignerProcessor.tokenizer`).
        context_length (`int`, *optional*): longest tokenisation kept, in tokens (default: the tokenizer's
            `model_max_length`). Batches are padded to their longest text, not to `context_length` as open_clip
            does: the aligner's pooling masks padding out, so only the compute differs.
    """

    def __init__(self, tokenizer, context_length: int | None = None):
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> BatchEncoding:
        """Tokenise `texts` (one string or a list of B strings).

        Returns:
            `BatchEncoding` with `input_ids` and `attention_mask` (and `token_type_ids` when the tokenizer makes them),
            each a (B, T) tensor; `.to(device)` moves it, and `model.encode_text` takes it.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"tokenizer: `texts` must be a str or a non-empty list of str, got {_describe(texts)}")
        max_length = context_length or self.context_length
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")


class AlignerImageTransform:
    """open_clip-style `preprocess`: one image -> its (C, H, W) `pixel_values`, by the aligner's image processor.

    Args:
        image_processor: the aligner's image processor (`AlignerProcessor.image_processor`).
    """

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, image) -> torch.Tensor:
        """`image`: one PIL image (or an (H, W, C) array). Returns a float tensor of shape (C, H, W); stack several
        into the (B, C, H, W) batch `model.encode_image` takes."""
        if isinstance(image, (list, tuple)):
            raise TypeError(
                f"preprocess transforms one image, got a {type(image).__name__} of {len(image)}; call it per image "
                "(a torch Dataset's transform) or give the batch to the aligner's image processor"
            )
        # The gate every image path shares: a strip would be resized into a huge tensor before the encoder runs.
        check_image_size(self.image_processor, image, "preprocess image")
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def create_model_and_transforms(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    context_length: int | None = None,
    **kwargs,
) -> tuple[AlignerModel, AlignerImageTransform, AlignerTokenizer]:
    """Load a saved aligner as open_clip's `(model, preprocess, tokenizer)`.

    Args:
        name_or_path: a saved aligner (Hub id or local folder) with its processor files.
        device: where the model runs (default: where `from_pretrained` put it).
        context_length (`int`, *optional*): the tokenizer's truncation length (see `AlignerTokenizer`).
        **kwargs: passed to `AlignerModel.from_pretrained` (`revision`, `dtype`, ...).

    Returns:
        `model` (`AlignerModel` in eval mode), `preprocess` (`AlignerImageTransform`: one image -> (C, H, W)) and
        `tokenizer` (`AlignerTokenizer`: list of B strings -> (B, T) tokens for `model.encode_text`).
    """
    model = AlignerModel.from_pretrained(name_or_path, **kwargs)
    if model.processor is None:
        raise ValueError(
            f"the aligner at {str(name_or_path)!r} has no processor files (preprocessor_config.json, tokenizer): "
            "save an AlignerProcessor with it to build preprocess and tokenizer"
        )
    if device is not None:
        model.to(device)
    return (
        model.eval(),
        AlignerImageTransform(model.processor.image_processor),
        AlignerTokenizer(model.processor.tokenizer, context_length),
    )


def get_tokenizer(name_or_path: str | os.PathLike, context_length: int | None = None, **kwargs) -> AlignerTokenizer:
    """The `tokenizer` of `create_model_and_transforms` alone, as `open_clip.get_tokenizer`; `kwargs` go to
    `AlignerProcessor.from_pretrained` (`revision`, ...)."""
    return AlignerTokenizer(AlignerProcessor.from_pretrained(name_or_path, **kwargs).tokenizer, context_length)


class ClassificationDataset(torch.utils.data.Dataset):
    """A labelled `datasets.Dataset` as clip_benchmark's classification loaders present one: item i is
    `(preprocess(image), label)`, and `.classes` lists the class names (`zeroshot_classification.evaluate` reads
    `dataloader.dataset.classes`).

    Args:
        dataset (`datasets.Dataset`): images and integer labels.
        preprocess: per-image transform (the `preprocess` of `create_model_and_transforms`).
        classes (`list[str]`, *optional*): class names by label; default: the label column's `ClassLabel` names.
        image_column / label_column (`str`): the columns read.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        preprocess,
        classes: Sequence[str] | None = None,
        image_column: str = "image",
        label_column: str = "label",
    ):
        _check_columns(dataset, image_column=image_column, label_column=label_column)
        if classes is None:
            feature = dataset.features[label_column]
            if not isinstance(feature, datasets.ClassLabel):
                raise ValueError(
                    f"classes not given and column {label_column!r} is not a ClassLabel with names "
                    f"(it is {type(feature).__name__})"
                )
            classes = feature.names
        self.dataset, self.preprocess, self.classes = dataset, preprocess, list(classes)
        self.image_column, self.label_column = image_column, label_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.dataset[index]
        return self.preprocess(row[self.image_column]), row[self.label_column]


class RetrievalDataset(torch.utils.data.Dataset):
    """An image-caption `datasets.Dataset` as clip_benchmark's retrieval loaders present one: item i is
    `(preprocess(image), [caption, ...])`, all captions of image i (a caption cell holds a str or a list of str).
    Batch it with `collate_fn=collate_image_captions`.

    Args:
        dataset (`datasets.Dataset`): one row per image.
        preprocess: per-image transform (the `preprocess` of `create_model_and_transforms`).
        image_column / text_column (`str`): the columns read.
    """

    def __init__(
        self, dataset: datasets.Dataset, preprocess, image_column: str = "image", text_column: str = "caption"
    ):
        _check_columns(dataset, image_column=image_column, text_column=text_column)
        self.dataset, self.preprocess = dataset, preprocess
        self.image_column, self.text_column = image_column, text_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[str]]:
        row = self.dataset[index]
        captions = row[self.text_column]
        return self.preprocess(row[self.image_column]), [captions] if isinstance(captions, str) else list(captions)


def collate_image_captions(batch: Sequence[tuple[torch.Tensor, list[str]]]) -> tuple[torch.Tensor, list[list[str]]]:
    """`DataLoader` collate for `RetrievalDataset`: the (B, C, H, W) images stacked, the B caption lists as a list
    (they differ in length, so they cannot be stacked)."""
    return torch.stack([image for image, _ in batch]), [captions for _, captions in batch]


def _check_columns(dataset, **columns: str) -> None:
    for argument, column in columns.items():
        if column not in dataset.column_names:
            raise ValueError(f"{argument}={column!r} is not a column of the dataset: {dataset.column_names}")


def _describe(value) -> str:
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(v).__name__ for v in value})
        return f"an empty {type(value).__name__}" if not value else f"a {type(value).__name__} of {kinds}"
    return type(value).__name__


__all__ = [
    "AlignerImageTransform",
    "AlignerTokenizer",
    "ClassificationDataset",
    "RetrievalDataset",
    "collate_image_captions",
    "create_model_and_transforms",
    "get_tokenizer",
]
