"""`AlignerConfig`: everything needed to rebuild an aligner and re-attach its frozen encoders."""

from __future__ import annotations

import math
import typing
from typing import Any

from transformers import PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

POOLINGS = ("auto", "cls", "mean", "tokens")
# Keys a config.json may carry that transformers itself consumes (its fields, plus legacy names it still accepts).
_TRANSFORMERS_KEYS = frozenset(PretrainedConfig().to_dict()) | {
    "torch_dtype",
    "name_or_path",
    "_commit_hash",
    "num_labels",
    "attn_implementation",
    "experts_implementation",
}


def check_layer(name: str, value: Any) -> int | str:
    """A layer tap is a hidden-state index (negative counts from the end) or "auto" (layer selection)."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ValueError(f"{name} must be an int hidden-state index (negative allowed) or 'auto', got {value!r}")


def check_pooling(name: str, value: Any) -> str:
    if value not in POOLINGS:
        raise ValueError(f"{name} must be one of {POOLINGS}, got {value!r}")
    return value


def check_positive_int(name: str, value: Any, expected: str = "a positive int") -> int:
    """`value` must be an int >= 1 (bools, floats and strings refused: YAML and JSON turn typos into those)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """`value` must be a finite int/float within [low, high] (bounds optional, each inclusive or not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        bounds = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"{name} must be in {bounds}, got {value!r}")
    return value


def check_settings(owner: str, settings_class: type, values: dict[str, Any]) -> None:
    """Type-check keyword settings of a method's or regulariser's settings dataclass against its field annotations.

    Fields annotated `int`, `float`, `bool` or `str` must hold exactly that (a bool is not an int, a float must be
    finite, an int is a float); other annotations and unknown names are left to the dataclass (`from_kwargs` lists
    the names it accepts). Run before the dataclass is built, whose own range checks may assume the types: a recipe
    or config.json with `projection_dim: "512"` or `bias: "no"` then fails by name when the aligner is built.
    """
    kinds = {int: "an int", float: "a finite number", bool: "True or False", str: "a string"}
    hints = typing.get_type_hints(settings_class)
    for name, value in values.items():
        kind = hints.get(name)
        if kind not in kinds:
            continue
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is str:
            ok = isinstance(value, str)
        else:
            ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
            ok = ok and (kind is int or math.isfinite(value))
        if not ok:
            raise ValueError(f"{owner!r} setting {name} must be {kinds[kind]}, got {value!r}")


def _check_optional(name: str, value: Any, kind: type | tuple[type, ...], expected: str) -> None:
    if value is not None and not isinstance(value, kind):
        raise ValueError(f"{name} must be {expected} or None, got {value!r}")


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
        encoder_lora (`list[str]`): encoders ("vision", "text") carrying a LoRA adapter, saved beside the aligner
            weights in `<modality>_encoder_lora/` (`hf_align.lora`).
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
        encoder_lora: list | None = None,
        training_summary: dict | None = None,
        hf_align_version: str | None = None,
        **kwargs,
    ):
        for name, value in (("vision_encoder", vision_encoder), ("text_encoder", text_encoder)):
            _check_optional(name, value, str, "a Hub id or local path (str)")
        for name, value in (("vision_revision", vision_revision), ("text_revision", text_revision)):
            _check_optional(name, value, str, "a revision (str)")
        sizes = (
            ("vision_hidden_size", vision_hidden_size),
            ("text_hidden_size", text_hidden_size),
            ("vision_num_layers", vision_num_layers),
            ("text_num_layers", text_num_layers),
        )
        for name, value in sizes:
            if value is not None:
                check_positive_int(name, value, "a positive int or None")
        flags = (
            ("vision_has_cls", vision_has_cls),
            ("learnable_temperature", learnable_temperature),
            ("bundled_encoders", bundled_encoders),
        )
        for name, value in flags:
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        for name, value in (("method", method), ("similarity", similarity)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a registry name (non-empty str), got {value!r}")
        settings = (
            ("method_config", method_config),
            ("similarity_config", similarity_config),
            ("regularizers", regularizers),
            ("training_summary", training_summary),
        )
        for name, value in settings:
            _check_optional(name, value, dict, "a dict")
        for name, value in (regularizers or {}).items():
            if not isinstance(value, dict):
                raise ValueError(f"regularizers[{name!r}] must be a dict of that regulariser's settings, got {value!r}")
        if encoder_lora is not None and (
            not isinstance(encoder_lora, list) or not set(encoder_lora) <= {"vision", "text"}
        ):
            raise ValueError(f"encoder_lora must be a list of 'vision' and/or 'text', got {encoder_lora!r}")
        unknown = sorted(set(kwargs) - _TRANSFORMERS_KEYS)
        if unknown:
            # A newer hf_align may have added fields: load what we understand, but say what is being ignored.
            from .version import __version__

            writer = f"hf_align {hf_align_version}" if hf_align_version else "an unknown hf_align version"
            logger.warning(
                f"AlignerConfig got fields that hf_align {__version__} does not know: {unknown} (config written by "
                f"{writer}); they are kept in the config but nothing here uses them"
            )
        self.hf_align_version = hf_align_version
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
        check_number("contrastive_temperature", contrastive_temperature, low=0.0, low_inclusive=False)
        self.contrastive_temperature = float(contrastive_temperature)
        self.learnable_temperature = learnable_temperature
        self.bundled_encoders = bundled_encoders
        self.encoder_lora = list(encoder_lora or [])
        self.training_summary = dict(training_summary or {})
        super().__init__(**kwargs)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """Write `config.json`, stamped with the hf_align version that wrote it (a later version can then tell which
        fields it may not know)."""
        from .version import __version__

        self.hf_align_version = __version__
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

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


# The tasks an evaluation record in `AlignerConfig.training_summary["evaluations"]` can name, as Hub task ids: the
# `evaluate_*` functions label their results with them and the model card's `model-index` lists them. Defined here,
# below both, so that evaluation need not import the card.
TASK_ZERO_SHOT = "zero-shot-image-classification"
TASK_RETRIEVAL = "image-text-retrieval"
TASK_SEGMENTATION = "image-segmentation"
