"""Prompt templates for zero-shot tasks (`{}` is replaced by the class name) and the class prototypes made of them.

`IMAGENET_TEMPLATES` are the 80 prompts CLIP used for ImageNet (Radford et al., 2021); `class_prototypes` averages
the normalised text embeddings of a class's prompts (docs/methods.md §9). Zero-shot classification
(`hf_align.evaluation`) and zero-shot segmentation (`hf_align.model.segmentation`) both score against these
prototypes; they live here, below the model, so that neither has to import the other.
The model is only annotated, never imported.

A template comes from the caller (a pipeline argument, a Space's text box), and `str.format` runs whatever it says:
`"{:>1500000000}"` builds a 1.5 GB string, `"{0.__class__}"` reads attributes. `check_template` is the one gate every
zero-shot entry point (`class_prototypes`, so `evaluate_zero_shot` and segmentation; the zero-shot pipeline; the
Space) puts templates through: exactly one bare `{}`, so a prompt is never longer than the template plus the label.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .modeling import AlignerModel
    from .processing import AlignerProcessor

IMAGENET_TEMPLATES = [
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
]

DEFAULT_TEMPLATES = IMAGENET_TEMPLATES


# Text and doubled (literal) braces around exactly one bare `{}`: no field name, conversion or format spec can appear.
# Templates are quoted in errors up to this length: an error should not copy a huge template.
_QUOTE = reprlib.Repr()
_QUOTE.maxstring = 200
_ONE_BARE_PLACEHOLDER = re.compile(r"(?:[^{}]|\{\{|\}\})*\{\}(?:[^{}]|\{\{|\}\})*", re.DOTALL)


def check_template(template, argument: str = "template") -> str:
    """`template`, checked to hold exactly one bare `{}` and otherwise only text and doubled braces (`{{`, `}}`).

    Raises:
        ValueError: naming `argument` and the template, for a non-string or any other template (`{0}`, `{!r}`,
            `{:>9}`, `{}{}`, no placeholder, a lone brace).
    """
    if not isinstance(template, str):
        raise ValueError(
            f"{argument} must be a string with one '{{}}' for the class name, got {type(template).__name__}"
        )
    if not _ONE_BARE_PLACEHOLDER.fullmatch(template):
        raise ValueError(
            f"{argument}={_QUOTE.repr(template)} must hold exactly one bare '{{}}' for the class name, with no field "
            "name, conversion or format spec (such as '{0}', '{!r}' or '{:>9}'); write a literal brace as '{{' or '}}'"
        )
    return template


def text_token_limit(model: AlignerModel, tokenizer, max_text_length: int | None = None) -> int:
    """Tokens a text keeps: `max_text_length`, else the tokenizer's maximum; never more than the text encoder has
    positions for (a mismatched tokenizer would otherwise crash the encoder on a long caption or label)."""
    limit = max_text_length or tokenizer.model_max_length
    positions = getattr(model.text_model.config, "max_position_embeddings", None)
    return min(limit, positions) if isinstance(positions, int) else limit


@torch.no_grad()
def embed_texts(
    model: AlignerModel, processor: AlignerProcessor, texts: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """(n, D) aligned embeddings of raw strings through the frozen text encoder, `batch_size` strings per forward;
    each string is cut to `text_token_limit` tokens.

    `processor` is the model's `AlignerProcessor`, or anything holding its `tokenizer` (a pipeline does).
    """
    out = []
    limit = text_token_limit(model, processor.tokenizer)
    for start in range(0, len(texts), batch_size):
        inputs = processor.tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=limit,
            return_tensors="pt",
        )
        out.append(model.get_text_features(**inputs.to(model.device)))
    return torch.cat(out)


@torch.no_grad()
def class_prototypes(
    model: AlignerModel,
    processor: AlignerProcessor,
    class_names: Sequence[str],
    templates: Sequence[str] | None = None,
) -> torch.Tensor:
    """(C, D) class embeddings: per class, the mean of its normalised template embeddings, renormalised.

    `templates` (each with exactly one bare `{}` for the class name, `check_template`) default to `DEFAULT_TEMPLATES`.
    """
    if not class_names:
        raise ValueError("class_names is empty: zero-shot classification needs at least one class")
    if len(set(class_names)) != len(class_names):
        duplicated = sorted({c for c in class_names if list(class_names).count(c) > 1})
        raise ValueError(f"class_names has duplicates {duplicated}: each class needs its own name")
    templates = list(templates or DEFAULT_TEMPLATES)
    for i, template in enumerate(templates):
        check_template(template, f"templates[{i}]")
    prompts = [t.format(name) for name in class_names for t in templates]
    embeds = embed_texts(model, processor, prompts).view(len(class_names), len(templates), -1)
    return F.normalize(embeds.mean(1), dim=-1)


__all__ = [
    "DEFAULT_TEMPLATES",
    "IMAGENET_TEMPLATES",
    "check_template",
    "class_prototypes",
    "embed_texts",
    "text_token_limit",
]
