"""One forward pass of a frozen encoder (`EncoderOutputs`) and the features taps read from it.

`run_vision_encoder` / `run_text_encoder` run an encoder once and collect everything a `Tap` (`hf_align.encoders.taps`)
can read: hidden states, the encoder's own final output, its pooled output, a dual encoder's projected embedding, a
sentence-transformers pipeline's embedding. `read_tap` reads one tap; `vision_taps` / `text_taps` read several from
one pass (feature extraction stores several layers at once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from .poolings import pool_tokens, right_align
from .taps import POOLED_SOURCES, Tap

# SigLIP towers: the pooled output is what the dual model scores with (there is no separate projection).
POOLER_IS_PROJECTION = frozenset(
    {"siglip_vision_model", "siglip2_vision_model", "siglip_text_model", "siglip2_text_model"}
)
# SigLIP text towers were trained on text padded to a fixed length with no attention mask, and pool the last position:
# their pooled output is read that way, so it does not depend on the batch's padding.
FIXED_LENGTH_TEXT = frozenset({"siglip_text_model", "siglip2_text_model"})
# Dual encoders whose towers project into the shared space: model_type -> modality -> (class, projection attribute).
PROJECTIONS = {
    "clip": {
        "vision": ("CLIPVisionModelWithProjection", "visual_projection"),
        "text": ("CLIPTextModelWithProjection", "text_projection"),
    }
}


@dataclass
class EncoderOutputs:
    """Everything a tap can read from one forward pass of an encoder.

    Args:
        hidden_states (`tuple(torch.FloatTensor)`): `(B, T, C)` sequences or `(B, C, H, W)` maps, embeddings first.
        last_hidden_state (`torch.FloatTensor`): the encoder's own final output, `(B, T, C)` or `(B, C, H, W)`.
        pooler_output / projected / sentence_embedding (`torch.FloatTensor` of shape `(B, D)`, *optional*): the
            encoder's pooled embedding, the dual encoder's projected one, the sentence-transformers pipeline's.
        attention_mask (`torch.LongTensor` of shape `(B, T)`, *optional*): text: the mask of the sequences above,
            padding on the right (`right_align`).
    """

    hidden_states: tuple[torch.Tensor, ...]
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None
    projected: torch.Tensor | None = None
    sentence_embedding: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


def dual_type(config: PretrainedConfig) -> str:
    """The dual-encoder family of a full model's or a tower's config (`clip_vision_model` -> `clip`)."""
    return config.model_type.removesuffix("_vision_model").removesuffix("_text_model")


def projection_of(model: nn.Module, modality: str) -> nn.Module | None:
    """The projection of a tower loaded with it (`CLIPVisionModelWithProjection.visual_projection`, ...), else None."""
    attr = PROJECTIONS.get(dual_type(model.config), {}).get(modality, ("", ""))[1]
    return getattr(model, attr, None) if attr and hasattr(model, f"{modality}_model") else None


def run_vision_encoder(encoder: nn.Module, pixel_values: torch.Tensor) -> EncoderOutputs:
    """One forward pass of a vision encoder (inputs moved to its device and dtype); gradients as the caller sets.

    Shapes: `pixel_values` (B, C, H, W) -> see `EncoderOutputs` (pooled outputs flattened to (B, D)).
    """
    param = next(encoder.parameters())
    pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
    projection = projection_of(encoder, "vision")
    tower = encoder.vision_model if projection is not None else encoder
    return _outputs(encoder, tower(pixel_values=pixel_values, output_hidden_states=True), projection)


def run_text_encoder(
    encoder: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    fixed_length: int | None = None,
) -> EncoderOutputs:
    """One forward pass of a text encoder on right-aligned inputs (`right_align`: either padding side works).

    Args:
        input_ids / attention_mask / token_type_ids (`torch.Tensor` of shape `(B, T)`).
        fixed_length (`int`, *optional*): pad to this length and pass no attention mask, as SigLIP text was trained
            (`text_fixed_length` says when a tap needs it).

    Returns:
        `EncoderOutputs` whose `attention_mask` marks the real tokens of its sequences (padding on the right).
    """
    device = next(encoder.parameters()).device
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    token_type_ids = None if token_type_ids is None else token_type_ids.to(device)
    attention_mask, input_ids, token_type_ids = right_align(attention_mask, input_ids, token_type_ids)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if fixed_length is not None:
        longest = int(attention_mask.sum(dim=1).max())
        if longest > fixed_length:
            raise ValueError(f"a text of {longest} tokens is longer than this encoder's fixed length {fixed_length}")
        pad = encoder.config.pad_token_id
        padded = torch.full((len(input_ids), fixed_length), pad, dtype=input_ids.dtype, device=device)
        mask = torch.zeros_like(padded)
        keep = min(fixed_length, input_ids.shape[1])
        real = attention_mask[:, :keep].bool()
        padded[:, :keep] = torch.where(real, input_ids[:, :keep], pad)
        mask[:, :keep] = real
        inputs, attention_mask = {"input_ids": padded}, mask
    elif token_type_ids is not None:
        inputs["token_type_ids"] = token_type_ids
    projection = projection_of(encoder, "text")
    tower = encoder.text_model if projection is not None else encoder
    outputs = _outputs(encoder, tower(**inputs, output_hidden_states=True), projection)
    outputs.attention_mask = attention_mask
    return outputs


def _outputs(encoder: nn.Module, out, projection: nn.Module | None) -> EncoderOutputs:
    pooled = getattr(out, "pooler_output", None)
    if pooled is not None and pooled.dim() > 2:
        pooled = pooled.flatten(1)  # (B, C, 1, 1) of ResNet-style poolers
    projected = projection(pooled) if projection is not None else None
    if projected is None and encoder.config.model_type in POOLER_IS_PROJECTION:
        projected = pooled
    return EncoderOutputs(
        hidden_states=tuple(out.hidden_states),
        last_hidden_state=out.last_hidden_state,
        pooler_output=pooled,
        projected=projected,
        sentence_embedding=getattr(out, "sentence_embedding", None),
    )


def text_fixed_length(encoder: nn.Module, tap: Tap) -> int | None:
    """The length SigLIP-style text towers are padded to (without a mask) for their pooled taps; `None` otherwise."""
    if tap.source in ("pooler_output", "projected") and encoder.config.model_type in FIXED_LENGTH_TEXT:
        return int(encoder.config.max_position_embeddings)
    return None


# ---------------------------------------------------------------------------------------------------- taps
def read_tap(
    outputs: EncoderOutputs, tap: Tap, num_prefix_tokens: int = 0, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The features `tap` reads from one forward pass: `(B, D)` and `None`, or `(B, T, D)` tokens and `(B, T)` mask.

    `num_prefix_tokens` (vision): leading CLS / register tokens of the tapped sequence
    (`EncoderInfo.num_prefix_tokens`); `mean` and `max` leave them out, `cls` needs one. `dtype`: cast the read
    output to it before pooling (feature extraction pools bf16 outputs in float32).
    """
    if tap.source in POOLED_SOURCES:
        value = getattr(outputs, tap.source)
        if value is None:
            raise ValueError(f"this encoder gives no {tap.source!r}; its tap must read another source")
        return (value if dtype is None else value.to(dtype)), None
    state = outputs.hidden_states[tap.layer] if tap.source == "hidden_states" else outputs.last_hidden_state
    if tap.pooling == "cls" and outputs.attention_mask is None and not num_prefix_tokens:
        raise ValueError("vision pooling 'cls' but this vision encoder has no CLS token here; use 'mean'")
    state = state if dtype is None else state.to(dtype)
    return pool_tokens(state, tap.pooling, outputs.attention_mask, num_prefix_tokens)


def vision_taps(
    encoder: nn.Module, pixel_values: torch.Tensor, taps: Sequence[Tap], num_prefix_tokens: Mapping[str, int] | int = 0
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Read several taps from one forward pass of a vision encoder; one `read_tap` result per tap, in order.

    `num_prefix_tokens`: one count for every tap, or a count per source (`EncoderInfo.num_prefix_tokens`).
    """
    outputs = run_vision_encoder(encoder, pixel_values)
    counts = num_prefix_tokens if isinstance(num_prefix_tokens, Mapping) else None
    return [read_tap(outputs, tap, counts.get(tap.source, 0) if counts else num_prefix_tokens) for tap in taps]


def text_taps(
    encoder: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    taps: Sequence[Tap],
    token_type_ids: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Read several taps of a text encoder: one forward pass per input regime (one, except for a SigLIP text tower
    asked for both pooled and token taps); one `read_tap` result per tap, in order."""
    results: list = [None] * len(taps)
    regimes: dict[int | None, list[int]] = {}
    for i, tap in enumerate(taps):
        regimes.setdefault(text_fixed_length(encoder, tap), []).append(i)
    for fixed_length, indices in regimes.items():
        outputs = run_text_encoder(encoder, input_ids, attention_mask, token_type_ids, fixed_length)
        for i in indices:
            results[i] = read_tap(outputs, taps[i])
    return results
