"""`AlignerModel`: a small trainable aligner stacked on two frozen Hub encoders, with CLIP-compatible outputs.

What runs the encoders (their outputs, the tapped features, `encode_image` / `encode_text`) is `AlignerModel`'s mixin
`hf_align.model.encoder_io.EncoderIOMixin`; loading and checking the encoders is `hf_align.model.encoder_loading`'s.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput, logging

from ..encoders import lora
from ..encoders.loading import EncoderInfo
from ..functional.losses import symmetric_infonce
from ..methods import AlignerMethod, MethodConfig
from ..utils.safe_loading import BUNDLE_SUBFOLDERS, check_loading_info, raise_if_pickle_only
from . import encoder_loading
from .aligner_parts import (
    AlignerChoices,
    AlignerParts,
    aligner_settings,
    check_source_request,
    check_weights_fit_config,
    resolve_parts,
)
from .card import AlignerModelCardData, write_model_card
from .configuration import AlignerConfig, check_layer
from .encoder_io import EncoderIOMixin, require_encoders
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


class AlignerModel(EncoderIOMixin, PreTrainedModel):
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
        *,
        method_config: dict | MethodConfig | None = None,
        regularizers: dict[str, dict] | None = None,
        similarity: str = "cosine",
        similarity_config: dict | None = None,
        structure_weight: float | str | None = None,
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
            vision_encoder: any vision `AutoModel` id or path (or an already loaded model).
            text_encoder: any text `AutoModel` id or path (or an already loaded model).
            method: registry name (`hf_align.methods.METHODS`).
            vision_layer: hidden-state index to tap (negative from the end) or `"auto"` (layer
                selection among the hidden states).
            text_layer: the same for the text encoder.
            vision_pooling: `auto`, `cls`, `mean`, `max`, for text also `last` and `weightedmean`,
                `tokens` (token methods; what their `auto` means) or `none` (a pooled source).
            text_pooling: the same for the text encoder.
            vision_revision: Hub revision to load (the resolved commit is recorded either way).
            text_revision: the same for the text encoder.
            dtype: dtype the encoders are loaded in (e.g. `torch.bfloat16` on a GPU).
            encoder_lora: a `peft.LoraConfig` for both encoders, or `{"vision": LoraConfig, "text": LoraConfig}`:
                LoRA adapters on the encoders' last blocks, trained with the aligner on raw inputs
                (`hf_align.encoders.lora`).
            vision_source: `auto`, `hidden_states`, `last_hidden_state`, `pooler_output`, `projected`
                (a CLIP / SigLIP repo's projected embedding) or, for text, `sentence_embedding` (the repo's
                sentence-transformers pipeline); see `hf_align.encoders.taps`.
            text_source: the same for the text encoder.
            vision_num_prefix_tokens: leading CLS / register tokens of the tapped vision sequence, which `mean` and
                `max` leave out (default: counted on the encoder, e.g. 5 for DINOv2 with registers).
            method_config: the method's settings, a dict (`{"projection_dim": 512}`) or its settings dataclass
                (e.g. `LinearConfig(projection_dim=512)`); they may also be given as keywords (`projection_dim=512`).
            regularizers: extra loss terms by name with their settings, e.g. `{"structure": {"weight": 10.0}}`.
            similarity: the similarity head (`hf_align.similarity`), `"cosine"` by default.
            similarity_config: the head's settings (e.g. `{"hidden_dim": 256}` for `"mlp"`).
            structure_weight: shorthand for `regularizers={"structure": {"weight": ...}}` (λ, or `"auto"`).
            **kwargs: `temperature`, `learnable_temperature`, the method's settings as keywords, and
                `<regulariser>_<field>` keywords (`structure_levels=2`), routed only when they name a field of that
                regulariser and not one of the method's. One setting given two ways is a `ValueError`.
        """
        requests = {
            "vision": (vision_encoder, vision_revision, vision_layer, vision_source, vision_num_prefix_tokens),
            "text": (text_encoder, text_revision, text_layer, text_source, None),
        }
        for modality, (_, _, layer, source, _) in requests.items():  # every check before any loading
            check_layer(f"{modality}_layer", layer)
            check_source_request(modality, layer, source)
        choices = AlignerChoices(method_config, regularizers, similarity, similarity_config, structure_weight)
        settings, parts = aligner_settings(method, vision_pooling, text_pooling, kwargs, choices)
        lora_configs = lora.split_encoder_lora(encoder_lora) if encoder_lora is not None else {}
        tokens = parts.method.input_kind == "tokens"
        encoders, fields = encoder_loading.load_requested_encoders(requests, settings, dtype, tokens)
        config = AlignerConfig(**fields, **settings)
        model = cls(config, vision_model=encoders["vision"], text_model=encoders["text"], _parts=parts)
        model.processor = encoder_loading.try_load_processor(
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
        *,
        method_config: dict | MethodConfig | None = None,
        regularizers: dict[str, dict] | None = None,
        similarity: str = "cosine",
        similarity_config: dict | None = None,
        structure_weight: float | str | None = None,
        **kwargs,
    ) -> AlignerModel:
        """An aligner-only model (no encoders) for features of the given widths, e.g. a cache or a synthetic task.

        Takes the same `method`, `method_config`, `regularizers`, `similarity`, `similarity_config`,
        `structure_weight` and `**kwargs` as `from_encoders`; it runs on `vision_features` / `text_features` only.
        """
        for name, value in (("vision_hidden_size", vision_hidden_size), ("text_hidden_size", text_hidden_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        choices = AlignerChoices(method_config, regularizers, similarity, similarity_config, structure_weight)
        settings, parts = aligner_settings(method, vision_pooling, text_pooling, kwargs, choices)
        config = AlignerConfig(vision_hidden_size=vision_hidden_size, text_hidden_size=text_hidden_size, **settings)
        return cls(config, _parts=parts).eval()

    def attach_encoders(self, vision_model: PreTrainedModel, text_model: PreTrainedModel) -> None:
        """Register the frozen encoders after checking they produce what the aligner was built for: its tap's source
        and width, and for a `sentence_embedding` tap the sentence-transformers pipeline recorded in the config."""
        infos = encoder_loading.probe_attached(self.config, vision_model, text_model)
        self.vision_model = vision_model.requires_grad_(False).eval()
        self.text_model = text_model.requires_grad_(False).eval()
        self._encoder_info = infos

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
        rebuild = False
        encoder_info = self.encoder_info if self.has_encoders else None  # else the widths must be given
        for modality, layer, width in (
            ("vision", vision_layer, vision_hidden_size),
            ("text", text_layer, text_hidden_size),
        ):
            if layer is not None:
                rebuild |= self.config.set_layer(modality, layer, width, encoder_info)
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

    # ------------------------------------------------------------------ embeddings
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
            require_encoders(self, "bundle_encoders=True")
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
        encoder_loading.reload_encoders(
            model, pretrained_model_name_or_path, vision_model, text_model, kwargs.get("revision"), dtype
        )
        return (model, info) if return_info else model
