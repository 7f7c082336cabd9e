"""`AlignerModel`: a small trainable aligner stacked on two frozen Hub encoders, with CLIP-compatible outputs."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput, logging

from ..encoders import lora
from ..encoders.loading import (
    EncoderInfo,
    load_bundled_encoder,
    load_encoder,
    non_finite_rows,
    probe_text,
    probe_vision,
)
from ..encoders.outputs import EncoderOutputs, read_tap, run_text_encoder, run_vision_encoder, text_fixed_length
from ..encoders.sentence_pipeline import SentenceEncoder, SentencePipeline
from ..encoders.taps import AUTO, default_pooling, tap_width
from ..functional.losses import symmetric_infonce
from ..methods import AlignerMethod, MethodConfig
from ..utils.safe_loading import BUNDLE_SUBFOLDERS, check_loading_info, raise_if_pickle_only
from .aligner_parts import (
    AlignerParts,
    aligner_settings,
    check_source_request,
    check_weights_fit_config,
    resolve_parts,
    tap_fields,
)
from .card import AlignerModelCardData, write_model_card
from .configuration import AlignerConfig, check_layer, resolve_layer_index
from .hub import upload_aligner
from .processing import AlignerProcessor
from .segmentation import segment_images

logger = logging.get_logger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp on the learnable temperature
ENCODER_PREFIXES = ("vision_model.", "text_model.")


@dataclass
class AlignerOutput(ModelOutput):
    """Outputs of [`AlignerModel.forward`], named as `CLIPOutput` so CLIP tooling works unchanged.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): total training loss, when `return_loss=True`.
        logits_per_image (`torch.FloatTensor` of shape `(n_images, n_texts)`): similarity / temperature.
        logits_per_text (`torch.FloatTensor` of shape `(n_texts, n_images)`): the transpose.
        image_embeds (`torch.FloatTensor` of shape `(n_images, embed_dim)`): aligned, L2-normalised.
        text_embeds (`torch.FloatTensor` of shape `(n_texts, embed_dim)`): aligned, L2-normalised.
        loss_terms (`dict[str, torch.FloatTensor]`, *optional*): each term of `loss` (InfoNCE, regularisers, ...).
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    loss_terms: dict | None = None


class AlignerModel(PreTrainedModel):
    r"""Frozen vision encoder + frozen text encoder + trainable aligner (see `hf_align.methods`).

    Only the aligner (and the temperature) is part of the checkpoint; the encoders are reloaded from the ids and
    revisions the config records. The model runs on raw inputs (`pixel_values`, `input_ids`, ...) or on features
    already extracted from the tapped encoder layers (`vision_features`, `text_features`), which is how training on a
    feature cache works.
    """

    config_class = AlignerConfig
    base_model_prefix = "aligner"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = False

    def __init__(
        self,
        config: AlignerConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
        _parts: AlignerParts | None = None,
    ):
        # `_parts`: what `from_encoders` / `from_feature_dims` already validated for this config (before loading
        # anything), so that each check runs once per model; any other caller leaves it to be resolved here.
        super().__init__(config)
        if config.vision_hidden_size is None or config.text_hidden_size is None:
            raise ValueError(
                "AlignerConfig needs vision_hidden_size and text_hidden_size; build the model with "
                "AlignerModel.from_encoders(...) rather than from a bare config"
            )
        if _parts is None:
            _parts = resolve_parts(config)
        if config.resolved_vision_pooling == "cls" and not config.num_prefix_tokens("vision"):
            raise ValueError(
                "vision_pooling='cls' but the tapped vision sequence has no CLS token (vision_num_prefix_tokens=0); "
                "use 'mean' or 'auto'"
            )
        self.aligner = self._build_aligner(_parts.method, _parts.method_config)
        config.projection_dim = self.aligner.embed_dim  # the embedding width sentence-transformers reports
        self.similarity = self._build_similarity(_parts.similarity)
        self.regularizers = _parts.regularizers
        self.logit_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / config.contrastive_temperature)), requires_grad=config.learnable_temperature
        )
        self.processor: AlignerProcessor | None = None
        self._encoder_info: dict[str, EncoderInfo] = {}  # what probing each attached encoder found
        self.post_init()
        # Encoders are attached after post_init so that weight initialisation can never touch them.
        if vision_model is not None and text_model is not None:
            self.attach_encoders(vision_model, text_model)

    # ------------------------------------------------------------------ construction
    def _build_aligner(self, method_cls: type[AlignerMethod], method_config: MethodConfig) -> AlignerMethod:
        """The method at the config's layer widths (its settings were validated in `hf_align.model.aligner_parts`)."""
        aligner = method_cls(method_config, self.config.vision_hidden_size, self.config.text_hidden_size)
        aligner.vision_num_prefix_tokens = self.config.num_prefix_tokens("vision")
        return aligner

    def _build_similarity(self, similarity_cls: type[nn.Module]) -> nn.Module:
        """The similarity head for the aligner's embedding width (`similarity_config` checked in `aligner_parts`)."""
        return similarity_cls(self.aligner.embed_dim, **self.config.similarity_config)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # torch.nn.init functions are guarded by transformers: parameters loaded from a checkpoint are left alone.
        if module is self:
            nn.init.constant_(self.logit_scale, math.log(1.0 / self.config.contrastive_temperature))
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()

    @classmethod
    def from_encoders(
        cls,
        vision_encoder: str | PreTrainedModel,
        text_encoder: str | PreTrainedModel,
        method: str = "linear",
        vision_layer: int | str = -1,
        text_layer: int | str = -1,
        vision_pooling: str = "auto",
        text_pooling: str = "auto",
        vision_revision: str | None = None,
        text_revision: str | None = None,
        dtype: torch.dtype | str | None = None,
        encoder_lora=None,
        vision_source: str = "auto",
        text_source: str = "auto",
        vision_num_prefix_tokens: int | None = None,
        **kwargs,
    ) -> AlignerModel:
        """Stack a new (untrained) aligner on two encoders given as Hub ids, local paths or loaded models.

        What the aligner reads from each encoder (a `hf_align.encoders.taps.Tap`: source, layer, pooling) is resolved
        here and recorded in the config; `auto` picks what the encoder's authors embed with (README's compatibility
        matrix): for the last layer, the encoder's own pooled output (CLIP, SigLIP, ConvNeXt, Swin, EfficientNet,
        timm), a sentence-transformers repo's own pipeline, or its final tokens (`last_hidden_state`, with the final
        norm) pooled by CLS (ViT, DINOv2), last token (decoder-only text) or mean; an earlier layer reads
        `hidden_states[layer]`.

        Args:
            vision_encoder / text_encoder: any vision / text `AutoModel` id or path (or an already loaded model).
            method: registry name (`hf_align.methods.METHODS`).
            vision_layer / text_layer: hidden-state index to tap (negative from the end) or `"auto"` (layer
                selection among the hidden states).
            vision_pooling / text_pooling: `auto`, `cls`, `mean`, `max`, for text also `last` and `weightedmean`,
                `tokens` (token methods; what their `auto` means) or `none` (a pooled source).
            vision_revision / text_revision: Hub revision to load (the resolved commit is recorded either way).
            dtype: dtype the encoders are loaded in (e.g. `torch.bfloat16` on a GPU).
            encoder_lora: a `peft.LoraConfig` for both encoders, or `{"vision": LoraConfig, "text": LoraConfig}`:
                LoRA adapters on the encoders' last blocks, trained with the aligner on raw inputs
                (`hf_align.encoders.lora`).
            vision_source / text_source: `auto`, `hidden_states`, `last_hidden_state`, `pooler_output`, `projected`
                (a CLIP / SigLIP repo's projected embedding) or, for text, `sentence_embedding` (the repo's
                sentence-transformers pipeline); see `hf_align.encoders.taps`.
            vision_num_prefix_tokens: leading CLS / register tokens of the tapped vision sequence, which `mean` and
                `max` leave out (default: counted on the encoder, e.g. 5 for DINOv2 with registers).
            **kwargs: `similarity`, `similarity_config`, `temperature`, `learnable_temperature`, the method's own
                settings (e.g. `projection_dim=512`) and regulariser settings, as a mapping
                (`regularizers={"structure": {"weight": 10.0}}`) and/or as `<regulariser>_<field>` keywords
                (`structure_weight=10.0`); one field given both ways is a `ValueError`.
        """
        requests = {
            "vision": (vision_encoder, vision_revision, vision_layer, vision_source, vision_num_prefix_tokens),
            "text": (text_encoder, text_revision, text_layer, text_source, None),
        }
        for modality, (_, _, layer, source, _) in requests.items():  # every check before any loading
            check_layer(f"{modality}_layer", layer)
            check_source_request(modality, layer, source)
        settings, parts = aligner_settings(method, vision_pooling, text_pooling, kwargs)
        lora_configs = lora.split_encoder_lora(encoder_lora) if encoder_lora is not None else {}
        encoders, fields, tokens = {}, {}, parts.method.input_kind == "tokens"
        for modality, (given, revision, layer, source, prefix) in requests.items():
            encoder = load_encoder(modality, given, revision, dtype, source=source)
            probe = probe_vision if modality == "vision" else probe_text
            info = probe(encoder, _source_name(given, encoder))
            pooling = settings.pop(f"{modality}_pooling")
            tap, tapped = tap_fields(modality, info, layer, source, pooling, tokens, prefix)
            if isinstance(encoder, SentenceEncoder) and tap.source != "sentence_embedding":
                encoder = encoder.model  # the pipeline goes unread: the plain model, as from_pretrained reloads it
            elif tap.source == "sentence_embedding":
                fields["text_pipeline"] = encoder.pipeline.describe()
            encoders[modality] = encoder
            fields.update(tapped)
            fields[f"{modality}_encoder"] = info.name_or_path
            fields[f"{modality}_revision"] = revision or info.revision
        config = AlignerConfig(**fields, **settings)
        model = cls(config, vision_model=encoders["vision"], text_model=encoders["text"], _parts=parts)
        model.processor = _try_load_processor(
            config.vision_encoder, config.text_encoder, config.vision_revision, config.text_revision
        )
        if lora_configs:
            model.add_encoder_lora(**lora_configs)
        return model.eval()  # like from_pretrained: inference mode until a training loop says otherwise

    @classmethod
    def from_feature_dims(
        cls,
        vision_hidden_size: int,
        text_hidden_size: int,
        method: str = "linear",
        vision_pooling: str = "auto",
        text_pooling: str = "auto",
        **kwargs,
    ) -> AlignerModel:
        """An aligner-only model (no encoders) for features of the given widths, e.g. a cache or a synthetic task.

        Takes the same `method` / `**kwargs` as `from_encoders`; it runs on `vision_features` / `text_features` only.
        """
        for name, value in (("vision_hidden_size", vision_hidden_size), ("text_hidden_size", text_hidden_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        settings, parts = aligner_settings(method, vision_pooling, text_pooling, kwargs)
        config = AlignerConfig(vision_hidden_size=vision_hidden_size, text_hidden_size=text_hidden_size, **settings)
        return cls(config, _parts=parts).eval()

    def attach_encoders(self, vision_model: PreTrainedModel, text_model: PreTrainedModel) -> None:
        """Register the frozen encoders after checking they produce what the aligner was built for: its tap's source
        and width, and for a `sentence_embedding` tap the sentence-transformers pipeline recorded in the config."""
        vision_info = probe_vision(vision_model, self.config.vision_encoder)
        text_info = probe_text(text_model, self.config.text_encoder)
        for modality, info in (("vision", vision_info), ("text", text_info)):
            expected = getattr(self.config, f"{modality}_hidden_size")
            width = _tapped_width(self.config, modality, info)
            if width != expected:
                where = _tap_name(self.config, modality)
                raise ValueError(
                    f"{modality} encoder {info.name_or_path!r} gives width {width} at {where}, but the aligner "
                    f"weights expect {modality}_hidden_size={expected}"
                )
        _check_pipeline(self.config, text_model)
        self.vision_model = vision_model.requires_grad_(False).eval()
        self.text_model = text_model.requires_grad_(False).eval()
        self._encoder_info = {"vision": vision_info, "text": text_info}

    def encoder_info(self, modality: str) -> EncoderInfo:
        """What probing the attached `modality` encoder found when it was attached (hidden states, outputs and their
        widths, prefix tokens, ...; see `hf_align.encoders.EncoderInfo`)."""
        if modality not in self._encoder_info:
            raise ValueError(
                f"encoder_info: no {modality!r} encoder was attached (modalities: 'vision', 'text'; a model loaded "
                "with load_encoders=False has none)"
            )
        return self._encoder_info[modality]

    @property
    def has_encoders(self) -> bool:
        return isinstance(getattr(self, "vision_model", None), nn.Module) and isinstance(
            getattr(self, "text_model", None), nn.Module
        )

    def set_layers(
        self,
        vision_layer: int | None = None,
        text_layer: int | None = None,
        vision_hidden_size: int | None = None,
        text_hidden_size: int | None = None,
    ) -> None:
        """Point the aligner at other hidden states of the encoders (e.g. after layer selection).

        The width of the new layer comes from the argument, else from probing the attached encoder. The aligner is
        rebuilt (fresh weights) only when that width differs from the one it was built for. A modality that reads one
        of the encoder's own outputs after the last layer (`last_hidden_state`, `pooler_output`, ...) keeps it when
        given that last layer; another layer moves it to `hidden_states`, pooled as `auto` pools hidden states.
        """
        config, rebuild = self.config, False
        for modality, layer, width in (
            ("vision", vision_layer, vision_hidden_size),
            ("text", text_layer, text_hidden_size),
        ):
            if layer is None:
                continue
            absolute = resolve_layer_index(f"{modality}_layer", layer, getattr(config, f"{modality}_num_layers"))
            source = getattr(config, f"{modality}_source")
            if source != "hidden_states" and absolute == config.absolute_layer(modality):
                continue  # already read after that layer: the tap (the encoder's own output there) stays
            if width is None or source != "hidden_states":
                if not self.has_encoders:
                    raise ValueError(
                        f"set_layers: give {modality}_hidden_size (no encoders attached to probe)"
                        if source == "hidden_states"
                        else f"set_layers: the {modality} aligner reads {source!r}; moving it to a hidden state "
                        "needs the encoders attached (its pooling is chosen on the encoder)"
                    )
                info = self.encoder_info(modality)
                width = info.hidden_sizes[absolute] if width is None else width
            if source != "hidden_states":
                tokens = getattr(config, f"resolved_{modality}_pooling") == "tokens"
                pooling = "tokens" if tokens else default_pooling(info, modality, "hidden_states")
                setattr(config, f"{modality}_source", "hidden_states")
                setattr(config, f"{modality}_pooling", pooling)
                if modality == "vision":
                    config.vision_num_prefix_tokens = info.num_prefix_tokens["hidden_states"]
                else:
                    config.text_pipeline = None
            setattr(config, f"{modality}_layer", layer)
            if width != getattr(config, f"{modality}_hidden_size"):
                setattr(config, f"{modality}_hidden_size", width)
                rebuild = True
        if rebuild:  # same method, settings and head as validated at construction, at the new widths
            device = self.logit_scale.device
            self.aligner = self._build_aligner(type(self.aligner), self.aligner.config).to(device)
            self.similarity = self._build_similarity(type(self.similarity)).to(device)

    def train(self, mode: bool = True) -> AlignerModel:
        super().train(mode)
        # Frozen encoders stay in eval mode (no dropout) while the aligner trains.
        if self.has_encoders:
            self.vision_model.eval()
            self.text_model.eval()
            lora.set_lora_train_mode(self, mode)
        return self

    def add_encoder_lora(self, vision=None, text=None) -> None:
        """Put a trainable LoRA adapter (a `peft.LoraConfig`) on the vision and/or text encoder; see
        `hf_align.encoders.lora`."""
        lora.add_encoder_lora(self, vision=vision, text=text)

    # ------------------------------------------------------------------ encoders
    def tapped_vision_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the frozen vision encoder on `pixel_values` (B, C, H, W) and return its tapped layer, pooled as the
        aligner reads it: `(features, None)` with features (B, d_v), or for token methods (B, T, d_v) and a (B, T)
        mask. These are the aligner's inputs (what `config.tap("vision")` reads); `encode_image` returns its output."""
        tap = self.config.tap("vision")
        return read_tap(self.vision_outputs(pixel_values), tap, self.config.num_prefix_tokens("vision"))

    def tapped_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the frozen text encoder on `input_ids` (B, T) (+ `attention_mask`, `token_type_ids`, both (B, T); no
        mask = every position attended) and return its tapped layer, pooled as the aligner reads it: `(features,
        None)` with features (B, d_t), or for token methods (B, T, d_t) and a (B, T) mask. These are the aligner's
        inputs (what `config.tap("text")` reads; either padding side gives the same); `encode_text` returns its
        output."""
        tap = self.config.tap("text")
        fixed_length = text_fixed_length(self.text_model, tap) if self.has_encoders else None
        return read_tap(self.text_outputs(input_ids, attention_mask, token_type_ids, fixed_length), tap)

    def vision_token_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision sequence (B, T, C), or feature map (B, C, h, w), the tap reads its tokens from: `hidden_states`
        at the tapped layer, else the encoder's `last_hidden_state` (what token methods and segmentation read)."""
        outputs = self.vision_outputs(pixel_values)
        if self.config.vision_source == "hidden_states":
            return outputs.hidden_states[self.config.absolute_layer("vision")]
        return outputs.last_hidden_state

    def vision_outputs(self, pixel_values: torch.Tensor) -> EncoderOutputs:
        """One forward pass of the vision encoder on `pixel_values` (B, C, H, W): everything a tap can read
        (`hf_align.encoders.outputs.EncoderOutputs`). Without gradients unless a LoRA adapter trains."""
        self._require_encoders("pixel_values")
        with torch.no_grad() if not _any_trainable(self.vision_model) else torch.enable_grad():
            return run_vision_encoder(self.vision_model, pixel_values)

    def text_outputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        fixed_length: int | None = None,
    ) -> EncoderOutputs:
        """One forward pass of the text encoder on `input_ids` (B, T) (+ masks (B, T)): everything a tap can read.

        Left padding is moved to the right first (`hf_align.encoders.poolings.right_align`): the outputs' sequences and
        their `attention_mask` are right-padded whatever the tokenizer's side. `fixed_length`: see
        `hf_align.encoders.outputs.run_text_encoder`. Without gradients unless a LoRA adapter trains.
        """
        self._require_encoders("input_ids")
        with torch.no_grad() if not _any_trainable(self.text_model) else torch.enable_grad():
            return run_text_encoder(self.text_model, input_ids, attention_mask, token_type_ids, fixed_length)

    def vision_hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The vision encoder's `hidden_states` for `pixel_values`, embeddings first."""
        return self.vision_outputs(pixel_values).hidden_states

    def text_hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """The text encoder's `hidden_states` for `input_ids`, embeddings first, right-padded (`text_outputs`)."""
        return self.text_outputs(input_ids, attention_mask, token_type_ids).hidden_states

    def _require_encoders(self, argument: str) -> None:
        if not self.has_encoders:
            raise ValueError(
                f"`{argument}` given but this AlignerModel has no encoders attached (loaded with "
                "load_encoders=False?); pass precomputed vision_features/text_features instead"
            )

    # ------------------------------------------------------------------ embeddings
    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Aligned image embeddings, open_clip's `model.encode_image(images, normalize=False)`.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`): images prepared by the aligner's image
                processor (or by the `preprocess` of `hf_align.integrations.open_clip.create_model_and_transforms`).
            normalize (`bool`): L2-normalise the embeddings, which is what `get_image_features` returns.

        Returns:
            `torch.FloatTensor` of shape `(B, embed_dim)`: the aligner's output, unit-norm when `normalize=True`.
        """
        features, mask = self.tapped_vision_features(pixel_values)
        source = f"the vision encoder's output for `pixel_values` (vision_layer={self.config.vision_layer})"
        embeds = self.aligner.embed_image(*self._check_features("vision", features, mask, source))
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def encode_text(self, tokens: torch.Tensor | Mapping[str, torch.Tensor], normalize: bool = False) -> torch.Tensor:
        """Aligned text embeddings, open_clip's `model.encode_text(text, normalize=False)`.

        Args:
            tokens: what the aligner's tokenizer returns for a batch of strings: a mapping (`BatchEncoding`) with
                `input_ids` (B, T) and optionally `attention_mask` and `token_type_ids` (B, T), or the (B, T)
                `input_ids` tensor alone, which is read as unpadded (every position attended).
            normalize (`bool`): L2-normalise the embeddings, which is what `get_text_features` returns.

        Returns:
            `torch.FloatTensor` of shape `(B, embed_dim)`: the aligner's output, unit-norm when `normalize=True`.
        """
        if not isinstance(normalize, bool):
            # encode_text(input_ids, attention_mask) was the tapped-features call before it took open_clip's meaning
            raise TypeError(
                f"encode_text(tokens, normalize): normalize must be a bool, got {type(normalize).__name__}; the "
                "tapped encoder features of (input_ids, attention_mask, token_type_ids) are tapped_text_features(...)"
            )
        return self._embed_input_ids(*_token_inputs(tokens), normalize=normalize)

    def _embed_input_ids(self, input_ids, attention_mask, token_type_ids, normalize: bool) -> torch.Tensor:
        features, mask = self.tapped_text_features(input_ids, attention_mask, token_type_ids)
        source = f"the text encoder's output for `input_ids` (text_layer={self.config.text_layer})"
        embeds = self.aligner.embed_text(*self._check_features("text", features, mask, source))
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
        check_finite: bool = True,
        **kwargs,
    ) -> torch.Tensor:
        """Aligned, L2-normalised image embeddings (B, embed_dim), as a tensor (not an output object).

        Give either `pixel_values` (B, C, H, W) or `vision_features` from the tapped layer: (B, d_v) pooled, or
        (B, T, d_v) tokens with `vision_mask` (B, T). `check_finite=False` skips the NaN/Inf check of
        `vision_features` (one host-device sync), for callers whose features were checked once already (`train()`).
        """
        if vision_features is None and pixel_values is not None:
            return self.encode_image(pixel_values, normalize=True)
        features, mask = self._check_features("vision", vision_features, vision_mask, check_finite=check_finite)
        return F.normalize(self.aligner.embed_image(features, mask), dim=-1)

    def get_text_features(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        check_finite: bool = True,
        **kwargs,
    ) -> torch.Tensor:
        """Aligned, L2-normalised text embeddings (B, embed_dim), as a tensor.

        Give either tokenised `input_ids` (B, T) (+ `attention_mask`, `token_type_ids`) or `text_features` from the
        tapped layer: (B, d_t) pooled, or (B, T, d_t) tokens with `text_mask` (B, T). `check_finite=False` skips the
        NaN/Inf check of `text_features`, as in `get_image_features`.
        """
        if text_features is None and input_ids is not None:
            return self._embed_input_ids(input_ids, attention_mask, token_type_ids, normalize=True)
        features, mask = self._check_features("text", text_features, text_mask, check_finite=check_finite)
        return F.normalize(self.aligner.embed_text(features, mask), dim=-1)

    def _check_features(
        self, modality, features, mask, source=None, check_finite: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validate tapped-layer features against what the aligner was built for; move them to its device/dtype.

        `source` names where the features came from in errors (default: the `<modality>_features` argument).
        `check_finite=False` skips the value checks, NaN/Inf features and token masks with no real token (each a
        host-device sync on a GPU); `train()` makes them once, when the cache is loaded.
        """
        if features is None:
            raw_name = "pixel_values" if modality == "vision" else "input_ids"
            raise ValueError(f"give either `{raw_name}` or `{modality}_features`; got neither")
        expected_dim = getattr(self.config, f"{modality}_hidden_size")
        tokens = self.aligner.input_kind == "tokens"
        expected_rank = 3 if tokens else 2
        if features.dim() != expected_rank or features.shape[-1] != expected_dim:
            shape = f"(B, T, {expected_dim})" if tokens else f"(B, {expected_dim})"
            raise ValueError(
                f"{modality}_features must have shape {shape} for method {self.config.method!r} at "
                f"{modality}_layer={getattr(self.config, f'{modality}_layer')}, got {tuple(features.shape)}"
            )
        bad = non_finite_rows(features) if check_finite else None
        if bad:
            # One NaN row turns every score of its batch (and the InfoNCE loss) into NaN: refuse it by name.
            raise ValueError(
                f"{source or f'`{modality}_features`'} holds NaN or Inf in {len(bad)} of {len(features)} rows "
                f"(rows {bad[:10]}); remove those samples or fix the encoder's dtype (fp16 overflows past 65504)"
            )
        if tokens and mask is None:
            mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        elif tokens and check_finite:
            empty = (~mask.bool().any(dim=1)).nonzero().flatten().tolist()
            if empty:  # a softmax over no token: NaN pooling weights, then NaN scores for the whole batch
                raise ValueError(
                    f"{modality} sample(s) {empty[:8]} have no real token (all-padding {modality}_mask); drop them"
                )
        device = self.logit_scale.device
        features = features.to(device=device, dtype=self.logit_scale.dtype)
        return features, (mask.to(device) if mask is not None else None)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        return_dict: bool | None = None,
        image_ids: torch.Tensor | None = None,
        check_finite: bool = True,
        **kwargs,
    ) -> AlignerOutput | tuple:
        """Score every image against every text, CLIP style.

        Returns `logits_per_image` (n_images, n_texts) = similarity / temperature, its transpose
        `logits_per_text`, the normalised embeddings, and with `return_loss=True` (n_images == n_texts, pair i matches
        pair i) the symmetric InfoNCE plus the method's own terms.

        `image_ids` (`torch.LongTensor` of shape `(B,)`, *optional*, with `return_loss=True`): the image of each pair.
        Pairs i ≠ j with the same id (captions of one image) are not negatives of each other: they are masked out of
        InfoNCE in both directions and out of every regulariser that compares samples (`loss_terms`). `None` treats
        every other pair as a negative.

        `check_finite=False` skips the NaN/Inf check of the features (see `get_image_features`).
        """
        if vision_features is None and pixel_values is not None:
            vision_features, vision_mask = self.tapped_vision_features(pixel_values)
        if text_features is None and input_ids is not None:
            text_features, text_mask = self.tapped_text_features(input_ids, attention_mask, token_type_ids)
        image_embeds = self.get_image_features(
            vision_features=vision_features, vision_mask=vision_mask, check_finite=check_finite
        )
        text_embeds = self.get_text_features(
            input_ids=input_ids, text_features=text_features, text_mask=text_mask, check_finite=check_finite
        )

        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        # The embeddings are unit-norm here: a cosine head need not renormalise them.
        logits_per_image = self.similarity.score_unit_norm(image_embeds, text_embeds) * scale
        logits_per_text = logits_per_image.t()

        loss, terms = None, None
        if return_loss:
            terms = self.loss_terms(
                vision_features,
                text_features,
                image_embeds,
                text_embeds,
                logits_per_image,
                image_ids=image_ids,
                vision_mask=vision_mask,
                text_mask=text_mask,
            )
            loss = torch.stack(list(terms.values())).sum()
        output = AlignerOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            loss_terms=terms,
        )
        return output if return_dict is not False else output.to_tuple()

    def loss_terms(
        self,
        vision_features,
        text_features,
        image_embeds,
        text_embeds,
        logits_per_image,
        image_ids=None,
        vision_mask=None,
        text_mask=None,
    ):
        """Every training loss term by name: InfoNCE, the method's own terms, then each regulariser's.

        `image_ids` (B,), when given, masks same-image pairs out of InfoNCE's negatives and reaches every regulariser
        (see `forward`). The regularisers get the features as `aligner.regularizer_features` gives them (token methods
        pool their tokens there, by the masks; a mask left None means every token is real).
        """
        terms = {"infonce": symmetric_infonce(logits_per_image, image_ids)}
        terms.update(self.aligner.extra_loss(vision_features, text_features, image_embeds, text_embeds))
        if self.regularizers:
            vision_features = self.aligner.regularizer_features("vision", vision_features, vision_mask)
            text_features = self.aligner.regularizer_features("text", text_features, text_mask)
        for name, regularizer in self.regularizers.items():
            terms[name] = regularizer(vision_features, text_features, image_embeds, text_embeds, image_ids=image_ids)
        return terms

    def segment(self, images, class_names, templates=None, **kwargs):
        """Zero-shot segmentation: an (H, W) int64 label map per image, at the image's size (label c = class_names[c]);
        one image in, one map out. Protocol and options (`background`, `batch_size`): `segmentation_inference`."""
        return segment_images(self, self.processor, images, class_names, templates, **kwargs)

    # ------------------------------------------------------------------ save / load
    @property
    def model_card_data(self) -> AlignerModelCardData:
        """What the model card says beyond the config: the training run, its datasets, layer selection and the
        evaluations recorded with `add_evaluation` (kept in `config.training_summary`, so saved in config.json)."""
        return AlignerModelCardData(self)

    def aligner_state_dict(self) -> dict[str, torch.Tensor]:
        """The checkpoint's content: every tensor of the model except the frozen encoders'."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(ENCODER_PREFIXES)}

    def save_pretrained(self, save_directory: str | os.PathLike, bundle_encoders: bool = False, **kwargs) -> None:
        """Write `config.json`, `model.safetensors` (aligner weights only), the processor files and a model card.

        `bundle_encoders=True` also saves both encoders under `vision_encoder/` and `text_encoder/`, so the folder
        loads with no access to the encoders' own repos.
        """
        os.makedirs(save_directory, exist_ok=True)
        # transformers' own push would run before the processor and card are written: push the finished folder instead
        push_to_hub = kwargs.pop("push_to_hub", False)
        repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
        hub_kwargs = {
            k: kwargs.pop(k) for k in ("commit_message", "private", "token", "revision", "create_pr") if k in kwargs
        }
        state_dict = kwargs.pop("state_dict", None) or self.aligner_state_dict()
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(ENCODER_PREFIXES)}
        if bundle_encoders:
            self._require_encoders("bundle_encoders=True")
            for modality, subfolder in BUNDLE_SUBFOLDERS.items():
                lora.save_base_encoder(getattr(self, f"{modality}_model"), os.path.join(save_directory, subfolder))
        lora.save_encoder_lora(self, save_directory)
        was_bundled = self.config.bundled_encoders
        self.config.bundled_encoders = bundle_encoders or was_bundled
        try:
            super().save_pretrained(save_directory, state_dict=state_dict, **kwargs)
            if kwargs.get("is_main_process", True):
                write_model_card(self, save_directory)
        finally:
            self.config.bundled_encoders = was_bundled
        if self.processor is not None:
            self.processor.save_pretrained(save_directory)
        else:
            logger.warning(
                "this aligner has no processor: the saved folder cannot be used by pipeline(...) until an "
                "AlignerProcessor is saved into it"
            )
        if push_to_hub:
            upload_aligner(self, save_directory, repo_id, **hub_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        bundle_encoders: bool = False,
    ):
        """Upload what `save_pretrained` writes (config, aligner weights, processor files, model card) to `repo_id`.

        Replaces transformers' version, which would overwrite this model's card with a generic one. The card's usage
        snippet names `repo_id`; `tags` are added to its YAML. Returns the `huggingface_hub.CommitInfo`.
        """
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, bundle_encoders=bundle_encoders, max_shard_size=max_shard_size)
            return upload_aligner(
                self,
                folder,
                repo_id,
                commit_message=commit_message,
                commit_description=commit_description,
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
                tags=tags or (),
            )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        load_encoders: bool = True,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
        **kwargs,
    ) -> AlignerModel:
        """Load the aligner weights, then re-load both encoders with *their own* weights from the recorded ids.

        `load_encoders=False` gives an aligner-only model that works on precomputed features; `vision_model` /
        `text_model` reuse encoders the caller already has in memory.

        Weights load from safetensors only (a pickle `pytorch_model.bin` is refused: unpickling can run code), and an
        aligner whose checkpoint lacks or adds weights relative to its config is refused rather than half
        initialised at random. See SECURITY.md.
        """
        if kwargs.get("use_safetensors") is False:
            raise ValueError(
                "use_safetensors=False is not supported: hf_align loads aligner weights from safetensors only, since "
                "unpickling a pytorch_model.bin can run arbitrary code"
            )
        kwargs["use_safetensors"] = True
        return_info = kwargs.pop("output_loading_info", False)
        # Compared with the weights' headers before transformers allocates anything; validated once (`_parts`).
        parts = check_weights_fit_config(cls, pretrained_model_name_or_path, kwargs)
        if parts is not None:
            kwargs["_parts"] = parts
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except OSError as err:
            raise_if_pickle_only(pretrained_model_name_or_path, kwargs, err)
            raise
        check_loading_info(pretrained_model_name_or_path, info)
        model.logit_scale.requires_grad_(model.config.learnable_temperature)
        config = model.config
        # An aligner built with `from_feature_dims` records no encoders: it loads as what it was saved as.
        aligner_only = config.vision_encoder is None and config.text_encoder is None and not config.bundled_encoders
        if not load_encoders or (aligner_only and vision_model is None and text_model is None):
            return (model, info) if return_info else model
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        revision = kwargs.get("revision")
        encoders = {}
        for modality, given in (("vision", vision_model), ("text", text_model)):
            # The tap's source decides what loads with the model: a CLIP projection, a sentence-transformers pipeline.
            source = getattr(config, f"{modality}_source")
            if given is not None:
                encoders[modality] = load_encoder(modality, given, source=source)
            elif config.bundled_encoders:
                encoders[modality] = load_bundled_encoder(
                    modality, pretrained_model_name_or_path, revision, dtype, source=source
                )
            else:
                name, encoder_revision = getattr(config, f"{modality}_encoder"), getattr(config, f"{modality}_revision")
                if name is None:
                    raise ValueError(
                        f"the aligner at {pretrained_model_name_or_path!r} records no {modality}_encoder: pass "
                        f"{modality}_model=, or load_encoders=False for the aligner alone"
                    )
                encoders[modality] = load_encoder(modality, name, encoder_revision, dtype, source=source)
        model.attach_encoders(encoders["vision"].to(model.device), encoders["text"].to(model.device))
        lora.load_encoder_lora(model, pretrained_model_name_or_path, revision=revision)
        try:
            model.processor = AlignerProcessor.from_pretrained(pretrained_model_name_or_path, revision=revision)
        except (OSError, ValueError, TypeError) as err:
            logger.warning(f"no processor found with the aligner at {pretrained_model_name_or_path!r}: {err}")
        return (model, info) if return_info else model


def _source_name(given: str | PreTrainedModel, model: PreTrainedModel) -> str:
    """What the config records for an encoder: the Hub id, or an absolute path for a local folder."""
    name = given if isinstance(given, str) else (model.name_or_path or "")
    if name and os.path.isdir(name):
        return os.path.abspath(name)
    return name


_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _token_inputs(tokens) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`encode_text`'s `tokens` as `(input_ids, attention_mask, token_type_ids)`, the last two `None` when absent."""
    if isinstance(tokens, torch.Tensor):
        tokens = {"input_ids": tokens}
    elif not isinstance(tokens, Mapping):
        raise TypeError(
            "encode_text: `tokens` must be a (B, T) tensor of input ids or a mapping with `input_ids` (what the "
            f"aligner's tokenizer returns), got {type(tokens).__name__}"
        )
    unknown = sorted(set(tokens) - set(_TOKEN_KEYS))
    if unknown or "input_ids" not in tokens:
        raise ValueError(
            f"encode_text: `tokens` must hold `input_ids` and optionally `attention_mask`, `token_type_ids`; got keys "
            f"{sorted(tokens)}"
        )
    input_ids = tokens["input_ids"]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"encode_text: `input_ids` must be a (B, T) tensor, got {shape}")
    return input_ids, tokens.get("attention_mask"), tokens.get("token_type_ids")


def _tapped_width(config: AlignerConfig, modality: str, info: EncoderInfo) -> int:
    """Width of what the config's tap reads from the encoder `info` describes (layer `"auto"`: the last hidden
    state's, until layer selection)."""
    if getattr(config, f"{modality}_layer") == AUTO:
        return info.hidden_sizes[-1]
    tap = config.tap(modality)
    if tap.source == "hidden_states":
        resolve_layer_index(f"{modality}_layer", tap.layer, info.num_hidden_states)
    elif tap.source not in info.output_sizes:
        raise ValueError(
            f"{modality} encoder {info.name_or_path!r} gives no {tap.source!r} (it gives "
            f"{['hidden_states', *info.output_sizes]}), which this aligner reads ({modality}_source)"
        )
    return tap_width(info, tap)


def _tap_name(config: AlignerConfig, modality: str) -> str:
    """What the `modality` aligner reads, for messages: `hidden_states[-1] · cls`, `pooler_output`, ..."""
    if getattr(config, f"{modality}_layer") == AUTO:
        return f"{modality}_layer='auto'"
    return config.tap(modality).describe()


def _check_pipeline(config: AlignerConfig, text_model: nn.Module) -> None:
    """A `sentence_embedding` tap needs the text encoder to run the sentence-transformers pipeline it was built on."""
    if config.text_source != "sentence_embedding" or config.text_pipeline is None:
        return
    pipeline = getattr(text_model, "pipeline", None)  # through a LoRA wrapper too
    found = pipeline.describe() if isinstance(pipeline, SentencePipeline) else None
    if found != config.text_pipeline:
        raise ValueError(
            f"the aligner reads the sentence-transformers pipeline {json.dumps(config.text_pipeline, sort_keys=True)} "
            f"of its text encoder, but the text encoder given has "
            f"{json.dumps(found, sort_keys=True) if found is not None else 'none'}; load it with "
            "hf_align.encoders.load_encoder('text', ..., source='sentence_embedding') from the same repo"
        )


def _any_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _try_load_processor(vision: str, text: str, vision_revision, text_revision) -> AlignerProcessor | None:
    try:
        return AlignerProcessor.from_encoders(vision, text, vision_revision, text_revision)
    except (OSError, ValueError, TypeError) as err:
        logger.warning(f"could not build an AlignerProcessor for ({vision!r}, {text!r}): {err}")
        return None
