"""`AlignerConfig`: everything needed to rebuild an aligner and re-attach its frozen encoders."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from transformers import PretrainedConfig
from transformers.utils import logging

from ..encoders.taps import (
    AUTO,
    NO_POOLING,
    POOLED_SOURCES,
    SOURCES,
    TEXT_POOLINGS,
    VISION_POOLINGS,
    Tap,
    check_tap,
    default_pooling,
    legacy_tap,
)
from ..utils.checks import check_number, check_positive_int, check_upper_bounds

if TYPE_CHECKING:
    from ..encoders.loading import EncoderInfo

logger = logging.get_logger(__name__)

# What a config may hold; `check_tap` then checks the pooling against its modality and source.
POOLINGS = (AUTO, *TEXT_POOLINGS, NO_POOLING)
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
    """A pooling is `auto` or one of `hf_align.encoders.taps`' poolings for the modality `name` starts with."""
    allowed = (AUTO, *(VISION_POOLINGS if name.startswith("vision") else TEXT_POOLINGS), NO_POOLING)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_source(name: str, value: Any) -> str:
    """A tap source is one of `hf_align.encoders.taps.SOURCES` (`sentence_embedding` for text only)."""
    allowed = tuple(s for s in SOURCES if name.startswith("text") or s != "sentence_embedding")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


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
        vision_revision (`str`, *optional*): commit hash the encoder resolved to, or `None` for a local
            path. `from_pretrained` reloads exactly this revision.
        text_revision (`str`, *optional*): the same for the text encoder.
        vision_layer (`int` or `"auto"`): index into the encoder's `hidden_states` (0 = embeddings,
            -1 = last block). `"auto"` defers the choice to layer selection on a feature cache. Sources other than
            `hidden_states` follow the last layer: their layer is `-1`.
        text_layer (`int` or `"auto"`): the same for the text encoder.
        vision_source (`str`): what the aligner reads from the encoder (`hf_align.encoders.taps`):
            `hidden_states` (at the layer above), `last_hidden_state` (the encoder's own final output, with its final
            norm), `pooler_output` (its own pooled embedding), `projected` (a dual encoder's projected embedding) or,
            for text, `sentence_embedding` (the sentence-transformers pipeline recorded in `text_pipeline`). A config
            without this field (saved before taps existed) reads `hidden_states`, also for the last layer.
        text_source (`str`): the same for the text encoder.
        vision_pooling (`str`): how a sequence source becomes the aligner's input: `cls`, `mean` (over
            the real tokens, prefix tokens left out), `max`, for text also `last` (the last real token) and
            `weightedmean`, `tokens` (the whole sequence, for token methods), or `none` for the pooled sources.
            `auto` (what configs saved before taps hold; new aligners record a concrete value): vision `cls` when the
            sequence has a prefix token, else `mean`; text `mean`; `none` for a pooled source.
        text_pooling (`str`): the same for the text encoder.
        vision_hidden_size (`int`): width of the tapped features, fixed when the aligner is built.
        text_hidden_size (`int`): the same for the text encoder.
        vision_num_layers (`int`): number of hidden states the encoder exposes (for index checks).
        text_num_layers (`int`): the same for the text encoder.
        vision_has_cls (`bool`): whether token 0 of the vision `hidden_states` is a CLS token; what configs saved
            before `vision_num_prefix_tokens` existed count as their one prefix token.
        vision_num_prefix_tokens (`int`, *optional*): leading CLS / register tokens of the tapped vision sequence,
            which `mean` and `max` leave out and `cls` reads (DINOv2 with registers: 5). `None`: 1 when
            `vision_has_cls`, else 0.
        text_pipeline (`dict`, *optional*): with `text_source="sentence_embedding"`, the sentence-transformers
            pipeline the aligner was built on (`SentencePipeline.describe()`: pooling modes, Dense layers,
            Normalize); reloading checks that the text encoder still has it.
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
            weights in `<modality>_encoder_lora/` (`hf_align.encoders.lora`).
        training_summary (`dict`): what the last training run recorded (data sizes, layer selection, timings); used by
            the model card.
        projection_dim (`int`, *optional*): width of the aligned embeddings, recorded by `AlignerModel` (CLIP's name
            for it: what sentence-transformers' `get_sentence_embedding_dimension()` reads); not a setting.
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
        vision_source: str = "hidden_states",
        text_source: str = "hidden_states",
        vision_num_prefix_tokens: int | None = None,
        text_pipeline: dict | None = None,
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
        projection_dim: int | None = None,
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
        check_upper_bounds("AlignerConfig", dict(sizes, vision_num_prefix_tokens=vision_num_prefix_tokens))
        if vision_num_prefix_tokens is not None and (
            not isinstance(vision_num_prefix_tokens, int)
            or isinstance(vision_num_prefix_tokens, bool)
            or vision_num_prefix_tokens < 0
        ):
            raise ValueError(f"vision_num_prefix_tokens must be an int >= 0 or None, got {vision_num_prefix_tokens!r}")
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
            ("text_pipeline", text_pipeline),
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
            from ..version import __version__

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
        self.vision_source = check_source("vision_source", vision_source)
        self.text_source = check_source("text_source", text_source)
        self.vision_num_prefix_tokens = vision_num_prefix_tokens
        self.text_pipeline = dict(text_pipeline) if text_pipeline is not None else None
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
        _check_optional("projection_dim", projection_dim, int, "an int")
        self.projection_dim = projection_dim
        super().__init__(**kwargs)
        for modality in ("vision", "text"):  # source, pooling and layer together (layer "auto": hidden states)
            if getattr(self, f"{modality}_layer") != "auto" or getattr(self, f"{modality}_source") != "hidden_states":
                self.tap(modality)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """Write `config.json`, stamped with the hf_align version that wrote it (a later version can then tell which
        fields it may not know)."""
        from ..version import __version__

        self.hf_align_version = __version__
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @property
    def resolved_vision_pooling(self) -> str:
        return self._pooling("vision")

    @property
    def resolved_text_pooling(self) -> str:
        return self._pooling("text")

    def _pooling(self, modality: str) -> str:
        """The pooling the config names, `auto` resolved as configs saved before taps meant it."""
        pooling, source = getattr(self, f"{modality}_pooling"), getattr(self, f"{modality}_source")
        if pooling != AUTO:
            return pooling
        if source in POOLED_SOURCES:
            return NO_POOLING
        return "cls" if modality == "vision" and self.num_prefix_tokens("vision") else "mean"

    def tap(self, modality: str) -> Tap:
        """What the aligner reads from the `modality` encoder: a checked `hf_align.encoders.taps.Tap`.

        A config saved before taps existed (no `<modality>_source`) gives `Tap(layer, "hidden_states", pooling)`,
        exactly what such an aligner was trained on.

        Raises:
            ValueError: the layer is still `"auto"`, or source, layer and pooling do not fit together.
        """
        layer = getattr(self, f"{modality}_layer")
        if layer == "auto":
            raise ValueError(
                f"{modality}_layer is 'auto': run hf_align.select_layers on an all-layer feature cache "
                f"(or pass {modality}_layer=<int>) before using the aligner"
            )
        source = getattr(self, f"{modality}_source")
        if source == "hidden_states":
            return check_tap(legacy_tap(layer, self._pooling(modality)), modality)
        num = getattr(self, f"{modality}_num_layers")
        if layer not in (-1, None if num is None else num - 1):
            raise ValueError(
                f"{modality}_source={source!r} follows the last layer: {modality}_layer must be -1, got {layer}"
            )
        return check_tap(Tap(-1, source, self._pooling(modality)), modality)

    def num_prefix_tokens(self, modality: str) -> int:
        """Leading CLS / register tokens of the tapped sequence: `vision_num_prefix_tokens` (configs saved before it
        existed: 1 when `vision_has_cls`); text sequences have none."""
        if modality == "text":
            return 0
        if self.vision_num_prefix_tokens is not None:
            return self.vision_num_prefix_tokens
        return int(self.vision_has_cls)

    def absolute_layer(self, modality: str) -> int:
        """The tapped hidden-state index as a non-negative int (what the feature cache's layer columns are keyed by);
        the last one for sources after the last layer."""
        layer = self.tap(modality).layer
        return resolve_layer_index(f"{modality}_layer", layer, getattr(self, f"{modality}_num_layers"))

    def set_layer(
        self, modality: str, layer: int, width: int | None, encoder_info: Callable[[str], EncoderInfo] | None
    ) -> bool:
        """Point the `modality` tap at hidden state `layer`: one modality of `AlignerModel.set_layers`.

        `width` is the new layer's, else what `encoder_info(modality)` (the attached encoder's probe; `None` when no
        encoder is attached) says it is. A tap that reads one of the encoder's own outputs after the last layer
        (`last_hidden_state`, `pooler_output`, ...) keeps it when `layer` is that last layer; another layer moves it to
        `hidden_states`, pooled as `auto` pools hidden states. Returns whether `<modality>_hidden_size` changed, i.e.
        whether the aligner must be rebuilt.
        """
        absolute = resolve_layer_index(f"{modality}_layer", layer, getattr(self, f"{modality}_num_layers"))
        source = getattr(self, f"{modality}_source")
        if source != "hidden_states" and absolute == self.absolute_layer(modality):
            return False  # already read after that layer: the tap (the encoder's own output there) stays
        if width is None or source != "hidden_states":
            if encoder_info is None:
                raise ValueError(
                    f"set_layers: give {modality}_hidden_size (no encoders attached to probe)"
                    if source == "hidden_states"
                    else f"set_layers: the {modality} aligner reads {source!r}; moving it to a hidden state "
                    "needs the encoders attached (its pooling is chosen on the encoder)"
                )
            info = encoder_info(modality)
            width = info.hidden_sizes[absolute] if width is None else width
        if source != "hidden_states":
            tokens = self._pooling(modality) == "tokens"
            pooling = "tokens" if tokens else default_pooling(info, modality, "hidden_states")
            setattr(self, f"{modality}_source", "hidden_states")
            setattr(self, f"{modality}_pooling", pooling)
            if modality == "vision":
                self.vision_num_prefix_tokens = info.num_prefix_tokens["hidden_states"]
            else:
                self.text_pipeline = None
        setattr(self, f"{modality}_layer", layer)
        if width == getattr(self, f"{modality}_hidden_size"):
            return False
        setattr(self, f"{modality}_hidden_size", width)
        return True


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
