"""Loading frozen encoders, probing their layers, and tapping + pooling one hidden state.

Any vision `AutoModel` (ViT, DINOv2, CLIP/SigLIP vision towers, ConvNeXt, ...) and any text `AutoModel` (BERT, RoBERTa,
MPNet, sentence-transformers repos, ...) works: the only contract used is `output_hidden_states=True`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import AutoModel, PretrainedConfig, PreTrainedModel

# Vision towers whose sequence has no CLS token at position 0 (they pool with an attention head instead).
_NO_CLS_MODEL_TYPES = {"siglip_vision_model", "siglip2_vision_model", "siglip", "siglip2"}


class EncoderLoadError(OSError):
    """An encoder id or path could not be resolved (offline, typo, missing files)."""


@dataclass
class EncoderInfo:
    """What the aligner needs to know about a frozen encoder; read off one probe forward pass."""

    name_or_path: str
    revision: str | None
    num_hidden_states: int
    hidden_sizes: list[int]  # width of each hidden state (ConvNeXt stages differ)
    has_cls: bool


def load_encoder(
    modality: str, name_or_path: str, revision: str | None = None, dtype: torch.dtype | str | None = None
) -> PreTrainedModel:
    """Load an encoder with its own weights, frozen and in eval mode.

    A CLIP/SigLIP checkpoint holding both towers yields its `vision_model` / `text_model` part.
    """
    if isinstance(name_or_path, PreTrainedModel):
        model = name_or_path
    else:
        kwargs = {"revision": revision} if revision else {}
        if dtype is not None:
            kwargs["dtype"] = dtype
        try:
            model = AutoModel.from_pretrained(name_or_path, **kwargs)
        except (OSError, ValueError) as err:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "false", "")
            hint = " (HF_HUB_OFFLINE is set: only local paths and already-cached Hub ids resolve)" if offline else ""
            at = f" at {modality}_revision={revision!r}" if revision else ""
            raise EncoderLoadError(
                f"{modality}_encoder={name_or_path!r}{at} could not be loaded as a transformers AutoModel{hint}: {err}"
            ) from err
    model = _tower(modality, model)
    model.requires_grad_(False)
    model.eval()
    return model


def _tower(modality: str, model: PreTrainedModel) -> PreTrainedModel:
    """Pick one tower out of a dual encoder (CLIPModel, SiglipModel, ...)."""
    attr = f"{modality}_model"
    if hasattr(model, attr) and hasattr(model, "vision_model") and hasattr(model, "text_model"):
        return getattr(model, attr)
    return model


def encoder_revision(model: PreTrainedModel) -> str | None:
    """Commit hash the encoder was loaded at, `None` for local folders.

    transformers 4 kept it in `config._commit_hash`; transformers 5 no longer does, so it is read off the Hub cache the
    weights came from (`refs/main` -> `snapshots/<commit>/config.json`).
    """
    commit = getattr(model.config, "_commit_hash", None)
    name = getattr(model, "name_or_path", None) or ""
    if commit or not name or os.path.isdir(name):
        return commit
    from huggingface_hub import try_to_load_from_cache
    from transformers.utils.hub import extract_commit_hash

    cached = try_to_load_from_cache(name, "config.json")
    return extract_commit_hash(cached, None) if isinstance(cached, str) else None


def image_size_of(config: PretrainedConfig) -> int:
    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size or 224)


def probe_vision(model: PreTrainedModel, name_or_path: str) -> EncoderInfo:
    """Run one dummy image through the encoder to learn how many hidden states it has and how wide they are."""
    size = image_size_of(model.config)
    channels = getattr(model.config, "num_channels", 3)
    param = next(model.parameters())
    pixel_values = torch.zeros(1, channels, size, size, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        states = model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    has_cls = states[-1].dim() == 3 and model.config.model_type not in _NO_CLS_MODEL_TYPES
    return EncoderInfo(name_or_path, encoder_revision(model), len(states), [_width(s) for s in states], has_cls)


def probe_text(model: PreTrainedModel, name_or_path: str) -> EncoderInfo:
    param = next(model.parameters())
    input_ids = torch.ones(1, 4, dtype=torch.long, device=param.device)
    with torch.no_grad():
        states = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), output_hidden_states=True)
    states = states.hidden_states
    return EncoderInfo(name_or_path, encoder_revision(model), len(states), [s.shape[-1] for s in states], True)


def non_finite_rows(values: torch.Tensor) -> list[int]:
    """Indices of the rows (dim 0) of `values` (B, ...) holding a NaN or an Inf; empty when all are finite."""
    finite = torch.isfinite(values)
    if bool(finite.all()):  # one reduction (and one device sync) in the common, healthy case
        return []
    return torch.nonzero(~finite.reshape(len(values), -1).all(1)).flatten().tolist()


def _width(state: torch.Tensor) -> int:
    # Convolutional stages are (B, C, H, W); transformer blocks are (B, T, C).
    return state.shape[1] if state.dim() == 4 else state.shape[-1]


def as_token_sequence(state: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) feature maps become (B, H*W, C) token sequences; (B, T, C) passes through."""
    if state.dim() == 4:
        return state.flatten(2).transpose(1, 2)
    return state


def pool_vision(state: torch.Tensor, pooling: str, has_cls: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pool one vision hidden state. Returns (features, token_mask); the mask is only set for `tokens`.

    Shapes: state (B, T, C) or (B, C, H, W) -> (B, C) for `cls`/`mean`, (B, T, C) + mask (B, T) for `tokens`.
    """
    tokens = as_token_sequence(state)
    if pooling == "cls":
        if not has_cls:
            raise ValueError("vision_pooling='cls' but this vision encoder has no CLS token; use 'mean'")
        return tokens[:, 0], None
    if pooling == "mean":
        patches = tokens[:, 1:] if has_cls else tokens
        return patches.mean(dim=1), None
    if pooling == "tokens":
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    raise ValueError(f"unknown vision pooling {pooling!r}")


def pool_text(
    state: torch.Tensor, attention_mask: torch.Tensor, pooling: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pool one text hidden state (B, T, C): `mean` over non-padding tokens, `cls` = token 0, `tokens` keeps all."""
    mask = attention_mask.bool()
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(state.dtype)
        return (state * weights).sum(1) / weights.sum(1).clamp(min=1.0), None
    if pooling == "cls":
        return state[:, 0], None
    if pooling == "tokens":
        return state, mask
    raise ValueError(f"unknown text pooling {pooling!r}")
