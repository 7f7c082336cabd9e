"""`AlignerProcessor`: the vision encoder's image processor and the text encoder's tokenizer, saved with the aligner."""

from __future__ import annotations

from transformers import AutoImageProcessor, AutoTokenizer, BatchEncoding, ProcessorMixin


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
        image_processor = AutoImageProcessor.from_pretrained(vision_encoder, revision=vision_revision)
        tokenizer = AutoTokenizer.from_pretrained(text_encoder, revision=text_revision)
        # Masked mean pooling needs the padding mask; some tokenizers (SigLIP's) do not return it by default, and the
        # stock pipeline would then pool padding as if it were text.
        if "attention_mask" not in tokenizer.model_input_names:
            tokenizer.model_input_names = [*tokenizer.model_input_names, "attention_mask"]
        return cls(image_processor=image_processor, tokenizer=tokenizer)

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding=True, truncation=True, **kwargs):
        if images is None and text is None:
            raise ValueError("AlignerProcessor needs `images`, `text` or both; got neither")
        encoding = {}
        if text is not None:
            encoding.update(self.tokenizer(text, return_tensors=return_tensors, padding=padding, truncation=truncation))
        if images is not None:
            encoding.update(self.image_processor(images, return_tensors=return_tensors))
        return BatchEncoding(encoding, tensor_type=return_tensors)
