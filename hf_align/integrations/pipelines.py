"""transformers pipelines for aligners: zero-shot classification with cached labels, and gallery retrieval.

The stock `pipeline("zero-shot-image-classification", model=<aligner>)` already works on a saved aligner (the model
returns CLIP-style `logits_per_image` and the folder holds the processor files). hf_align adds two tasks, registered
with `transformers.pipelines.PIPELINE_REGISTRY` by `register_pipelines()` (which `import hf_align` runs):

Inputs are checked before any work: `hypothesis_template` must hold exactly one bare `{}`
(`hf_align.model.templates.check_template`), labels are tokenised with truncation, and an image the image processor
would blow up (a 4096×1 strip) raises `hf_align.model.processing.ImageSizeError` (`check_image_size`).

* `"hf-align-zero-shot-image-classification"`: same inputs and outputs as the stock task, but the text tower runs once
  per label set: its output for `(candidate_labels, hypothesis_template, tokenizer_kwargs)` is kept in a small LRU
  cache, and later calls only run the vision tower and the (cheap) aligner. Scores are exactly those of the stock task.
* `"hf-align-image-text-retrieval"`: `set_gallery(images=...)` (or `texts=...`) embeds a gallery once; each query of
  the other modality (`str` text, or an image / path / URL) returns its `top_k` gallery matches.

Batching (`batch_size=`), device (`device=`) and dtype (`dtype=`) are handled by the transformers `Pipeline` machinery
as for any other task.

```python
import hf_align
from transformers import pipeline

classifier = pipeline("hf-align-zero-shot-image-classification", model="user/aligner")
classifier(image, candidate_labels=["cat", "dog"])          # text tower runs
classifier(other_image, candidate_labels=["cat", "dog"])    # text tower skipped

retriever = pipeline("hf-align-image-text-retrieval", model="user/aligner").set_gallery(images=photos)
retriever("a dog on a beach", top_k=3)   # [{"score": 0.41, "index": 7, "image": photos[7]}, ...]
```
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence

import torch
from transformers.image_utils import load_image
from transformers.pipelines import PIPELINE_REGISTRY, Pipeline, ZeroShotImageClassificationPipeline

from ..model.modeling import AlignerModel
from ..model.processing import check_image_size
from ..model.templates import check_template, embed_texts, text_token_limit

ZERO_SHOT_TASK = "hf-align-zero-shot-image-classification"
RETRIEVAL_TASK = "hf-align-image-text-retrieval"


def _require_aligner(model, task: str) -> None:
    if not isinstance(model, AlignerModel):
        raise TypeError(f"the {task!r} pipeline needs an hf_align AlignerModel, got {type(model).__name__}")
    if not model.has_encoders:
        raise ValueError(
            f"the {task!r} pipeline runs raw images and text through the encoders, but this AlignerModel has none "
            "attached (loaded with load_encoders=False?)"
        )


class AlignerZeroShotImageClassificationPipeline(ZeroShotImageClassificationPipeline):
    """Zero-shot classification embedding each label set once (task `"hf-align-zero-shot-image-classification"`).

    Call it like the stock pipeline: `classifier(image_or_images, candidate_labels=[...], hypothesis_template=...)`,
    optionally `tokenizer_kwargs={...}`. Each result is a list of `{"score", "label"}` sorted by score, scores being
    the softmax of `logits_per_image` over the labels.

    What is cached is the text tower's output at the tapped layer, (C, d_t) pooled or (C, T, d_t) tokens + (C, T)
    mask, for the `label_cache_size` most recently used label sets; the aligner's text head (a few matrix products)
    still runs per call, so the scores equal `model(pixel_values=..., input_ids=..., ...)` exactly. Call
    `clear_label_cache()` after changing the text encoder's weights (e.g. training a LoRA adapter on it).
    """

    def __init__(self, *args, label_cache_size: int = 32, **kwargs):
        if not isinstance(label_cache_size, int) or isinstance(label_cache_size, bool) or label_cache_size < 1:
            raise ValueError(f"label_cache_size must be a positive int, got {label_cache_size!r}")
        super().__init__(*args, **kwargs)
        _require_aligner(self.model, ZERO_SHOT_TASK)
        self.label_cache_size = label_cache_size
        self._label_cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()

    def clear_label_cache(self) -> None:
        self._label_cache.clear()

    def _sanitize_parameters(self, tokenizer_kwargs=None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        if tokenizer_kwargs is not None:
            preprocess_params["tokenizer_kwargs"] = tokenizer_kwargs
        return preprocess_params, forward_params, postprocess_params

    def preprocess(
        self,
        image,
        candidate_labels=None,
        hypothesis_template="This is a photo of {}.",
        timeout=None,
        tokenizer_kwargs=None,
    ):
        if (
            not isinstance(candidate_labels, (list, tuple))
            or not candidate_labels
            or not all(isinstance(label, str) for label in candidate_labels)
        ):
            raise ValueError(f"candidate_labels must be a non-empty list of strings, got {candidate_labels!r}")
        check_template(hypothesis_template, "hypothesis_template")
        image = load_image(image, timeout=timeout)
        check_image_size(self.image_processor, image)
        inputs = self.image_processor(images=[image], return_tensors="pt").to(self.dtype)
        inputs["candidate_labels"] = list(candidate_labels)
        # Hashable cache key; tokenizer settings change the tokens, so they are part of it.
        inputs["label_set"] = (
            tuple(candidate_labels),
            hypothesis_template,
            json.dumps(tokenizer_kwargs or {}, sort_keys=True),
        )
        return inputs

    def _forward(self, model_inputs):
        candidate_labels = model_inputs.pop("candidate_labels")
        label_set = model_inputs.pop("label_set")
        if isinstance(label_set, list):
            # Batched by the DataLoader: every item of one call shares the call's labels and template.
            label_set = label_set[0]
        text_features, text_mask = self._label_features(label_set)
        outputs = self.model(**model_inputs, text_features=text_features, text_mask=text_mask)
        return {"candidate_labels": candidate_labels, "logits": outputs.logits_per_image}

    def _label_features(self, label_set: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tapped text-tower output for one label set: (C, d_t), or (C, T, d_t) + (C, T) mask for token methods."""
        cached = self._label_cache.get(label_set)
        if cached is not None:
            self._label_cache.move_to_end(label_set)
            return cached
        labels, template, tokenizer_json = label_set
        # Some tokenizers (SigLIP's) return no attention mask unless asked; without one the padding of the shorter
        # prompts would be pooled as if it were text. A label longer than the text encoder's positions is cut to
        # them, as captions are, rather than crashing the encoder.
        tokenizer_kwargs = {
            "padding": True,
            "truncation": True,
            "max_length": text_token_limit(self.model, self.tokenizer),
            "return_attention_mask": True,
            **json.loads(tokenizer_json),
        }
        tokens = self.tokenizer([template.format(label) for label in labels], return_tensors="pt", **tokenizer_kwargs)
        tokens = tokens.to(self.device)
        cached = self.model.tapped_text_features(
            tokens["input_ids"], tokens.get("attention_mask"), tokens.get("token_type_ids")
        )
        self._label_cache[label_set] = cached
        if len(self._label_cache) > self.label_cache_size:
            self._label_cache.popitem(last=False)
        return cached


class AlignerImageTextRetrievalPipeline(Pipeline):
    """Top-k image↔text retrieval over a gallery embedded once (task `"hf-align-image-text-retrieval"`).

    `set_gallery(images=[...])` makes queries texts (`str`); `set_gallery(texts=[...])` makes queries images (PIL
    images, local paths or URLs). `retriever(query_or_queries, top_k=5)` returns, per query, a list of
    `{"score", "index", "image" | "text"}` sorted by score: `score` is the aligner's similarity head applied to the
    aligned embeddings (cosine by default; not divided by the temperature), `index` the position in the gallery and
    `"image"` / `"text"` the gallery item as it was given.
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _require_aligner(self.model, RETRIEVAL_TASK)
        self.gallery_modality: str | None = None
        self.gallery_items: list = []
        self.gallery_embeds: torch.Tensor | None = None

    def set_gallery(
        self, images: Sequence | None = None, texts: Sequence[str] | None = None, batch_size: int = 32, timeout=None
    ):
        """Embed a gallery of images *or* texts once; returns the pipeline, so calls chain.

        Args:
            images: PIL images, local paths or URLs. texts: strings. Exactly one of the two, non-empty.
            batch_size: samples per encoder forward while embedding the gallery.
            timeout: seconds allowed to fetch each image URL.

        Stores `gallery_embeds`, (N, D) aligned L2-normalised embeddings on the pipeline's device.
        """
        # Imported here: evaluation pulls in `datasets`, which `import hf_align` (registering this module) avoids.
        from ..evaluation.zero_shot_retrieval import embed_images

        if (images is None) == (texts is None):
            raise ValueError("set_gallery needs exactly one of `images` or `texts`")
        items = list(images if images is not None else texts)
        if not items:
            raise ValueError(f"set_gallery got an empty gallery of {'images' if images is not None else 'texts'}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        with self.device_placement(), torch.no_grad():
            if images is not None:
                loaded = [load_image(image, timeout=timeout) for image in items]
                embeds = embed_images(self.model, self, loaded, batch_size=batch_size)
            else:
                not_text = [type(t).__name__ for t in items if not isinstance(t, str)]
                if not_text:
                    raise ValueError(f"texts must all be strings, got {sorted(set(not_text))}")
                embeds = embed_texts(self.model, self, items, batch_size=batch_size)
        self.gallery_modality = "image" if images is not None else "text"
        self.gallery_items = items
        self.gallery_embeds = embeds
        return self

    def _sanitize_parameters(self, top_k=None, timeout=None, **kwargs):
        preprocess_params, postprocess_params = {}, {}
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        if top_k is not None:
            if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
                raise ValueError(f"top_k must be a positive int, got {top_k!r}")
            postprocess_params["top_k"] = top_k
        return preprocess_params, {}, postprocess_params

    def preprocess(self, query, timeout=None):
        if self.gallery_modality is None:
            raise ValueError("no gallery yet: call set_gallery(images=[...]) or set_gallery(texts=[...]) first")
        if self.gallery_modality == "image":
            if not isinstance(query, str):
                raise ValueError(f"the gallery holds images, so queries must be text (str), got {type(query).__name__}")
            return self.tokenizer(
                [query],
                return_tensors="pt",
                truncation=True,
                max_length=text_token_limit(self.model, self.tokenizer),
                return_attention_mask=True,
            )
        image = load_image(query, timeout=timeout)
        check_image_size(self.image_processor, image)
        return self.image_processor(images=[image], return_tensors="pt").to(self.dtype)

    def _forward(self, model_inputs):
        """(B, N) scores of each query against every gallery item."""
        if self.gallery_modality == "image":
            queries = self.model.get_text_features(**model_inputs)
            return {"scores": self.model.similarity.score_unit_norm(self.gallery_embeds, queries).t()}
        queries = self.model.get_image_features(**model_inputs)
        return {"scores": self.model.similarity.score_unit_norm(queries, self.gallery_embeds)}

    def postprocess(self, model_outputs, top_k=5):
        scores = model_outputs["scores"][0].float()
        values, index = scores.topk(min(top_k, scores.numel()))
        return [
            {"score": value, "index": i, self.gallery_modality: self.gallery_items[i]}
            for value, i in zip(values.tolist(), index.tolist())
        ]


def register_pipelines() -> None:
    """Register hf_align's pipeline tasks with transformers; safe to call more than once."""
    for task, pipeline_class in (
        (ZERO_SHOT_TASK, AlignerZeroShotImageClassificationPipeline),
        (RETRIEVAL_TASK, AlignerImageTextRetrievalPipeline),
    ):
        if PIPELINE_REGISTRY.supported_tasks.get(task, {}).get("impl") is not pipeline_class:
            PIPELINE_REGISTRY.register_pipeline(
                task, pipeline_class=pipeline_class, pt_model=AlignerModel, type="multimodal"
            )


__all__ = [
    "RETRIEVAL_TASK",
    "ZERO_SHOT_TASK",
    "AlignerImageTextRetrievalPipeline",
    "AlignerZeroShotImageClassificationPipeline",
    "register_pipelines",
]
