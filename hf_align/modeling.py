"""`AlignerModel`: a small trainable aligner stacked on two frozen Hub encoders, with CLIP-compatible outputs."""

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

from . import lora
from .aligner_parts import AlignerParts, aligner_settings, resolve_parts
from .configuration import AlignerConfig, check_layer, resolve_layer_index
from .encoders import EncoderInfo, load_encoder, non_finite_rows, pool_text, pool_vision, probe_text, probe_vision
from .hub import upload_aligner
from .losses import symmetric_infonce
from .methods import AlignerMethod, MethodConfig
from .modelcard import AlignerModelCardData, write_model_card
from .processing import AlignerProcessor
from .safe_loading import BUNDLE_SUBFOLDERS, check_loading_info, load_bundled_encoder, raise_if_pickle_only
from .segmentation_inference import segment_images

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
        if config.resolved_vision_pooling == "cls" and not config.vision_has_cls:
            raise ValueError("vision_pooling='cls' but this vision encoder has no CLS token; use 'mean' or 'auto'")
        self.aligner = self._build_aligner(_parts.method, _parts.method_config)
        self.similarity = self._build_similarity(_parts.similarity)
        self.regularizers = _parts.regularizers
        self.logit_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / config.contrastive_temperature)), requires_grad=config.learnable_temperature
        )
        self.processor: AlignerProcessor | None = None
        self.post_init()
        # Encoders are attached after post_init so that weight initialisation can never touch them.
        if vision_model is not None and text_model is not None:
            self.attach_encoders(vision_model, text_model)

    # ------------------------------------------------------------------ construction
    def _build_aligner(self, method_cls: type[AlignerMethod], method_config: MethodConfig) -> AlignerMethod:
        """The method at the config's layer widths (its settings were validated in `hf_align.aligner_parts`)."""
        return method_cls(method_config, self.config.vision_hidden_size, self.config.text_hidden_size)

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
        **kwargs,
    ) -> AlignerModel:
        """Stack a new (untrained) aligner on two encoders given as Hub ids, local paths or loaded models.

        Args:
            vision_encoder / text_encoder: any vision / text `AutoModel` id or path (or an already loaded model).
            method: registry name (`hf_align.methods.METHODS`).
            vision_layer / text_layer: hidden-state index to tap (negative from the end) or `"auto"`.
            vision_pooling / text_pooling: `auto`, `cls`, `mean` or `tokens`; token methods default to `tokens`.
            vision_revision / text_revision: Hub revision to load (the resolved commit is recorded either way).
            dtype: dtype the encoders are loaded in (e.g. `torch.bfloat16` on a GPU).
            encoder_lora: a `peft.LoraConfig` for both encoders, or `{"vision": LoraConfig, "text": LoraConfig}`:
                LoRA adapters on the encoders' last blocks, trained with the aligner on raw inputs (`hf_align.lora`).
            **kwargs: `similarity`, `similarity_config`, `temperature`, `learnable_temperature`, the method's own
                settings (e.g. `projection_dim=512`) and regulariser settings, as a mapping
                (`regularizers={"structure": {"weight": 10.0}}`) and/or as `<regulariser>_<field>` keywords
                (`structure_weight=10.0`); one field given both ways is a `ValueError`.
        """
        check_layer("vision_layer", vision_layer)
        check_layer("text_layer", text_layer)
        settings, parts = aligner_settings(method, vision_pooling, text_pooling, kwargs)  # before any loading
        lora_configs = lora.split_encoder_lora(encoder_lora) if encoder_lora is not None else {}
        vision = load_encoder("vision", vision_encoder, vision_revision, dtype)
        text = load_encoder("text", text_encoder, text_revision, dtype)
        vision_info = probe_vision(vision, _source_name(vision_encoder, vision))
        text_info = probe_text(text, _source_name(text_encoder, text))
        config = AlignerConfig(
            vision_encoder=vision_info.name_or_path,
            text_encoder=text_info.name_or_path,
            vision_revision=vision_revision or vision_info.revision,
            text_revision=text_revision or text_info.revision,
            vision_layer=vision_layer,
            text_layer=text_layer,
            vision_hidden_size=_width_at("vision_layer", vision_info, vision_layer),
            text_hidden_size=_width_at("text_layer", text_info, text_layer),
            vision_num_layers=vision_info.num_hidden_states,
            text_num_layers=text_info.num_hidden_states,
            vision_has_cls=vision_info.has_cls,
            **settings,
        )
        model = cls(config, vision_model=vision, text_model=text, _parts=parts)
        model.processor = _try_load_processor(
            vision_info.name_or_path, text_info.name_or_path, config.vision_revision, config.text_revision
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
        """Register the frozen encoders after checking they produce what the aligner was built for."""
        vision_info = probe_vision(vision_model, self.config.vision_encoder)
        text_info = probe_text(text_model, self.config.text_encoder)
        for modality, info in (("vision", vision_info), ("text", text_info)):
            layer = getattr(self.config, f"{modality}_layer")
            expected = getattr(self.config, f"{modality}_hidden_size")
            width = _width_at(f"{modality}_layer", info, layer)
            if width != expected:
                raise ValueError(
                    f"{modality} encoder {info.name_or_path!r} gives width {width} at {modality}_layer={layer}, "
                    f"but the aligner weights expect {modality}_hidden_size={expected}"
                )
        self.vision_model = vision_model.requires_grad_(False).eval()
        self.text_model = text_model.requires_grad_(False).eval()

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
        """Point the aligner at other encoder layers (e.g. after layer selection).

        The width of the new layer comes from the argument, else from probing the attached encoder. The aligner is
        rebuilt (fresh weights) only when that width differs from the one it was built for.
        """
        rebuild = False
        for modality, layer, width in (
            ("vision", vision_layer, vision_hidden_size),
            ("text", text_layer, text_hidden_size),
        ):
            if layer is None:
                continue
            resolve_layer_index(f"{modality}_layer", layer, getattr(self.config, f"{modality}_num_layers"))
            if width is None:
                if not self.has_encoders:
                    raise ValueError(f"set_layers: give {modality}_hidden_size (no encoders attached to probe)")
                encoder = getattr(self, f"{modality}_model")
                info = probe_vision(encoder, "") if modality == "vision" else probe_text(encoder, "")
                width = _width_at(f"{modality}_layer", info, layer)
            setattr(self.config, f"{modality}_layer", layer)
            if width != getattr(self.config, f"{modality}_hidden_size"):
                setattr(self.config, f"{modality}_hidden_size", width)
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
        """Put a trainable LoRA adapter (a `peft.LoraConfig`) on the vision and/or text encoder; see `hf_align.lora`."""
        lora.add_encoder_lora(self, vision=vision, text=text)

    # ------------------------------------------------------------------ encoders
    def encode_vision(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the frozen vision encoder and return the tapped, pooled layer: (B, d_v), or (B, T, d_v) + mask."""
        states = self.vision_hidden_states(pixel_values)
        layer = self.config.absolute_layer("vision")
        return pool_vision(states[layer], self.config.resolved_vision_pooling, self.config.vision_has_cls)

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the frozen text encoder and return the tapped, pooled layer: (B, d_t), or (B, T, d_t) + mask."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        states = self.text_hidden_states(input_ids, attention_mask, token_type_ids)
        layer = self.config.absolute_layer("text")
        return pool_text(states[layer], attention_mask, self.config.resolved_text_pooling)

    def vision_hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._require_encoders("pixel_values")
        encoder = self.vision_model
        param = next(encoder.parameters())
        with torch.no_grad() if not _any_trainable(encoder) else torch.enable_grad():
            out = encoder(
                pixel_values=pixel_values.to(device=param.device, dtype=param.dtype), output_hidden_states=True
            )
        return out.hidden_states

    def text_hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        self._require_encoders("input_ids")
        encoder = self.text_model
        device = next(encoder.parameters()).device
        kwargs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids.to(device)
        with torch.no_grad() if not _any_trainable(encoder) else torch.enable_grad():
            out = encoder(**kwargs, output_hidden_states=True)
        return out.hidden_states

    def _require_encoders(self, argument: str) -> None:
        if not self.has_encoders:
            raise ValueError(
                f"`{argument}` given but this AlignerModel has no encoders attached (loaded with "
                "load_encoders=False?); pass precomputed vision_features/text_features instead"
            )

    # ------------------------------------------------------------------ embeddings
    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Aligned, L2-normalised image embeddings (B, embed_dim), as a tensor (not an output object).

        Give either `pixel_values` (B, C, H, W) or `vision_features` from the tapped layer: (B, d_v) pooled, or
        (B, T, d_v) tokens with `vision_mask` (B, T).
        """
        source = None
        if vision_features is None and pixel_values is not None:
            vision_features, vision_mask = self.encode_vision(pixel_values)
            source = f"the vision encoder's output for `pixel_values` (vision_layer={self.config.vision_layer})"
        features, mask = self._check_features("vision", vision_features, vision_mask, source)
        return F.normalize(self.aligner.embed_image(features, mask), dim=-1)

    def get_text_features(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Aligned, L2-normalised text embeddings (B, embed_dim), as a tensor.

        Give either tokenised `input_ids` (B, T) (+ `attention_mask`, `token_type_ids`) or `text_features` from the
        tapped layer: (B, d_t) pooled, or (B, T, d_t) tokens with `text_mask` (B, T).
        """
        source = None
        if text_features is None and input_ids is not None:
            text_features, text_mask = self.encode_text(input_ids, attention_mask, token_type_ids)
            source = f"the text encoder's output for `input_ids` (text_layer={self.config.text_layer})"
        features, mask = self._check_features("text", text_features, text_mask, source)
        return F.normalize(self.aligner.embed_text(features, mask), dim=-1)

    def _check_features(self, modality, features, mask, source=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validate tapped-layer features against what the aligner was built for; move them to its device/dtype.

        `source` names where the features came from in errors (default: the `<modality>_features` argument).
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
        bad = non_finite_rows(features)
        if bad:
            # One NaN row turns every score of its batch (and the InfoNCE loss) into NaN: refuse it by name.
            raise ValueError(
                f"{source or f'`{modality}_features`'} holds NaN or Inf in {len(bad)} of {len(features)} rows "
                f"(rows {bad[:10]}); remove those samples or fix the encoder's dtype (fp16 overflows past 65504)"
            )
        if tokens and mask is None:
            mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
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
        **kwargs,
    ) -> AlignerOutput | tuple:
        """Score every image against every text, CLIP style.

        Returns `logits_per_image` (n_images, n_texts) = similarity / temperature, its transpose
        `logits_per_text`, the normalised embeddings, and with `return_loss=True` (n_images == n_texts, pair i matches
        pair i) the symmetric InfoNCE plus the method's own terms.
        """
        if vision_features is None and pixel_values is not None:
            vision_features, vision_mask = self.encode_vision(pixel_values)
        if text_features is None and input_ids is not None:
            text_features, text_mask = self.encode_text(input_ids, attention_mask, token_type_ids)
        image_embeds = self.get_image_features(vision_features=vision_features, vision_mask=vision_mask)
        text_embeds = self.get_text_features(input_ids=input_ids, text_features=text_features, text_mask=text_mask)

        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        logits_per_image = self.similarity(image_embeds, text_embeds) * scale
        logits_per_text = logits_per_image.t()

        loss, terms = None, None
        if return_loss:
            terms = self.loss_terms(vision_features, text_features, image_embeds, text_embeds, logits_per_image)
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

    def loss_terms(self, vision_features, text_features, image_embeds, text_embeds, logits_per_image):
        """Every training loss term by name: InfoNCE, the method's own terms, then each regulariser's."""
        terms = {"infonce": symmetric_infonce(logits_per_image)}
        terms.update(self.aligner.extra_loss(vision_features, text_features, image_embeds, text_embeds))
        for name, regularizer in self.regularizers.items():
            terms[name] = regularizer(vision_features, text_features, image_embeds, text_embeds)
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
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except OSError as err:
            raise_if_pickle_only(pretrained_model_name_or_path, kwargs, err)
            raise
        check_loading_info(pretrained_model_name_or_path, info)
        model.logit_scale.requires_grad_(model.config.learnable_temperature)
        if not load_encoders:
            return (model, info) if return_info else model
        config = model.config
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        revision = kwargs.get("revision")
        encoders = {}
        for modality, given in (("vision", vision_model), ("text", text_model)):
            if given is not None:
                encoders[modality] = load_encoder(modality, given)
            elif config.bundled_encoders:
                encoders[modality] = load_bundled_encoder(modality, pretrained_model_name_or_path, revision, dtype)
            else:
                source = getattr(config, f"{modality}_encoder")
                encoders[modality] = load_encoder(modality, source, getattr(config, f"{modality}_revision"), dtype)
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


def _width_at(name: str, info: EncoderInfo, layer: int | str) -> int:
    if layer == "auto":
        return info.hidden_sizes[-1]
    return info.hidden_sizes[resolve_layer_index(name, layer, info.num_hidden_states)]


def _any_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _try_load_processor(vision: str, text: str, vision_revision, text_revision) -> AlignerProcessor | None:
    try:
        return AlignerProcessor.from_encoders(vision, text, vision_revision, text_revision)
    except (OSError, ValueError, TypeError) as err:
        logger.warning(f"could not build an AlignerProcessor for ({vision!r}, {text!r}): {err}")
        return None
