"""What `AlignerModel` runs through its frozen encoders and hands its aligner, as a mixin of `AlignerModel`
(`EncoderIOMixin`): one forward pass of an encoder (`vision_outputs` / `text_outputs`), the tapped features the
aligner reads (`tapped_*_features`), the token state segmentation reads, the aligned embeddings of raw inputs
(`encode_image` / `encode_text`) and the checks every feature batch passes before the aligner sees it.

The mixin reads what `AlignerModel` builds: `config`, `aligner`, `logit_scale`, `has_encoders` and, once attached, the
frozen `vision_model` / `text_model`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..encoders.loading import non_finite_rows
from ..encoders.outputs import EncoderOutputs, read_tap, run_text_encoder, run_vision_encoder, text_fixed_length
from ..utils.deprecation import deprecated_method

_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class EncoderIOMixin:
    """`AlignerModel`'s encoder-facing methods: raw inputs in, encoder outputs, tapped features or embeddings out."""

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
        require_encoders(self, "pixel_values")
        with torch.no_grad() if not any_trainable(self.vision_model) else torch.enable_grad():
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
        require_encoders(self, "input_ids")
        with torch.no_grad() if not any_trainable(self.text_model) else torch.enable_grad():
            return run_text_encoder(self.text_model, input_ids, attention_mask, token_type_ids, fixed_length)

    @deprecated_method("hf_align.AlignerModel.vision_hidden_states")
    def vision_hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The vision encoder's `hidden_states` for `pixel_values`, embeddings first.

        Deprecated (`hf_align.utils.deprecation.MOVED_METHODS`): use `vision_outputs(pixel_values).hidden_states`."""
        return self.vision_outputs(pixel_values).hidden_states

    @deprecated_method("hf_align.AlignerModel.text_hidden_states")
    def text_hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """The text encoder's `hidden_states` for `input_ids`, embeddings first, right-padded (`text_outputs`).

        Deprecated (`hf_align.utils.deprecation.MOVED_METHODS`): use `text_outputs(...).hidden_states`."""
        return self.text_outputs(input_ids, attention_mask, token_type_ids).hidden_states

    # ------------------------------------------------------------------ embeddings of raw inputs
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
        return self._embed_input_ids(*token_inputs(tokens), normalize=normalize)

    def _embed_input_ids(self, input_ids, attention_mask, token_type_ids, normalize: bool) -> torch.Tensor:
        features, mask = self.tapped_text_features(input_ids, attention_mask, token_type_ids)
        source = f"the text encoder's output for `input_ids` (text_layer={self.config.text_layer})"
        embeds = self.aligner.embed_text(*self._check_features("text", features, mask, source))
        return F.normalize(embeds, dim=-1) if normalize else embeds

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


def require_encoders(model: EncoderIOMixin, argument: str) -> None:
    """Refuse raw inputs (`argument`: `pixel_values`, `input_ids`, ...) on an `AlignerModel` without encoders."""
    if not model.has_encoders:
        raise ValueError(
            f"`{argument}` given but this AlignerModel has no encoders attached (loaded with "
            "load_encoders=False?); pass precomputed vision_features/text_features instead"
        )


def any_trainable(module: nn.Module) -> bool:
    """Whether any parameter of `module` trains (a LoRA adapter on a frozen encoder): its pass then keeps gradients."""
    return any(p.requires_grad for p in module.parameters())


def token_inputs(tokens) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`encode_text`'s `tokens` (a (B, T) tensor or a mapping of (B, T) tensors) as `(input_ids, attention_mask,
    token_type_ids)`, the last two `None` when absent."""
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
