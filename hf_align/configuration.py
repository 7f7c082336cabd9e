"""`AlignerConfig`: everything needed to rebuild an aligner and re-attach its frozen encoders."""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig

POOLINGS = ("auto", "cls", "mean", "tokens")


def check_layer(name: str, value: Any) -> int | str:
    """A layer tap is a hidden-state index (negative counts from the end) or "auto" (layer selection)."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ValueError(f"{name} must be an int hidden-state index (negative allowed) or 'auto', got {value!r}")


def check_pooling(name: str, value: Any) -> str:
    if value not in POOLINGS:
        raise ValueError(f"{name} must be one of {POOLINGS}, got {value!r}")
    return value


class AlignerConfig(PretrainedConfig):
    r"""Configuration of an [`AlignerModel`].

    The encoders are *referenced*, not copied: `vision_encoder` / `text_encoder` hold a Hub id (with the resolved
    commit in `*_revision`) or a local path, exactly as PEFT records its base model.

    Args:
        vision_encoder (`str`): Hub id or local path of the vision `AutoModel`.
        text_encoder (`str`): Hub id or local path of the text `AutoModel`.
        vision_revision / text_revision (`str`, *optional*): commit hash the encoder resolved to, or `None` for a local
            path. `from_pretrained` reloads exactly this revision.
        vision_layer / text_layer (`int` or `"auto"`): index into the encoder's `hidden_states` (0 = embeddings,
            -1 = last block). `"auto"` defers the choice to layer selection on a feature cache.
        vision_pooling (`str`): `cls`, `mean` (over patch tokens), `tokens` (the whole sequence) or `auto` (`cls` when
            the encoder has a CLS token, else `mean`).
        text_pooling (`str`): `mean` (attention-masked), `cls`, `tokens` or `auto` (= `mean`).
        vision_hidden_size / text_hidden_size (`int`): width of the tapped layer, fixed when the aligner is built.
        vision_num_layers / text_num_layers (`int`): number of hidden states the encoder exposes (for index checks).
        vision_has_cls (`bool`): whether token 0 of the vision sequence is a CLS token.
        method (`str`): name of the aligner in the method registry (`hf_align.methods`).
        method_config (`dict`): the method's own settings (validated by its config dataclass).
        regularizers (`dict`): extra loss terms by name with their settings, e.g. `{"structure": {"weight": 10.0}}`
            (`hf_align.regularizers`).
        similarity (`str`): scoring head between aligned image and text embeddings (`hf_align.similarity`).
        similarity_config (`dict`): settings of that head (learned heads' sizes, OT parameters, ...).
        contrastive_temperature (`float`): InfoNCE temperature τ; logits are `similarity / τ`. (Not called
            `temperature`: transformers reserves that name for generation.)
        learnable_temperature (`bool`): train `logit_scale = ln(1/τ)` (clamped at ln 100) as CLIP does.
        bundled_encoders (`bool`): the encoders were saved inside the aligner folder (`vision_encoder/`,
            `text_encoder/`) for fully offline use.
        training_summary (`dict`): what the last training run recorded (data sizes, layer selection, timings); used by
            the model card.
    """

    model_type = "hf_align"

    def __init__(
        self,
        vision_encoder: str | None = None,
        text_encoder: str | None = None,
        vision_revision: str | None = None,
        text_revision: str | None = None,
        vision_layer: int | str = -1,
        text_layer: int | str = -1,
        vision_pooling: str = "auto",
        text_pooling: str = "auto",
        vision_hidden_size: int | None = None,
        text_hidden_size: int | None = None,
        vision_num_layers: int | None = None,
        text_num_layers: int | None = None,
        vision_has_cls: bool = True,
        method: str = "linear",
        method_config: dict | None = None,
        regularizers: dict | None = None,
        similarity: str = "cosine",
        similarity_config: dict | None = None,
        contrastive_temperature: float = 0.05,
        learnable_temperature: bool = False,
        bundled_encoders: bool = False,
        training_summary: dict | None = None,
        **kwargs,
    ):
        self.vision_encoder = vision_encoder
        self.text_encoder = text_encoder
        self.vision_revision = vision_revision
        self.text_revision = text_revision
        self.vision_layer = check_layer("vision_layer", vision_layer)
        self.text_layer = check_layer("text_layer", text_layer)
        self.vision_pooling = check_pooling("vision_pooling", vision_pooling)
        self.text_pooling = check_pooling("text_pooling", text_pooling)
        self.vision_hidden_size = vision_hidden_size
        self.text_hidden_size = text_hidden_size
        self.vision_num_layers = vision_num_layers
        self.text_num_layers = text_num_layers
        self.vision_has_cls = vision_has_cls
        self.method = method
        self.method_config = dict(method_config or {})
        self.regularizers = {name: dict(kw) for name, kw in (regularizers or {}).items()}
        self.similarity = similarity
        self.similarity_config = dict(similarity_config or {})
        t = contrastive_temperature
        if not (isinstance(t, (int, float)) and t > 0 and math.isfinite(t)):
            raise ValueError(f"contrastive_temperature must be a finite float > 0, got {t!r}")
        self.contrastive_temperature = float(t)
        self.learnable_temperature = bool(learnable_temperature)
        self.bundled_encoders = bundled_encoders
        self.training_summary = dict(training_summary or {})
        super().__init__(**kwargs)

    @property
    def resolved_vision_pooling(self) -> str:
        if self.vision_pooling == "auto":
            return "cls" if self.vision_has_cls else "mean"
        return self.vision_pooling

    @property
    def resolved_text_pooling(self) -> str:
        return "mean" if self.text_pooling == "auto" else self.text_pooling

    def absolute_layer(self, modality: str) -> int:
        """The tapped hidden-state index as a non-negative int (what the feature cache is keyed by)."""
        layer = getattr(self, f"{modality}_layer")
        num = getattr(self, f"{modality}_num_layers")
        if layer == "auto":
            raise ValueError(
                f"{modality}_layer is 'auto': run hf_align.select_layers on an all-layer feature cache "
                f"(or pass {modality}_layer=<int>) before using the aligner"
            )
        return resolve_layer_index(f"{modality}_layer", layer, num)


def resolve_layer_index(name: str, layer: int, num_hidden_states: int | None) -> int:
    """Map a possibly negative hidden-state index to its absolute value, checking the range."""
    if num_hidden_states is None:
        if layer < 0:
            raise ValueError(f"{name}={layer} is negative but the encoder's number of hidden states is unknown")
        return layer
    if not -num_hidden_states <= layer < num_hidden_states:
        raise ValueError(
            f"{name}={layer} is out of range: the encoder exposes {num_hidden_states} hidden states "
            f"(valid indices {-num_hidden_states}..{num_hidden_states - 1})"
        )
    return layer % num_hidden_states
