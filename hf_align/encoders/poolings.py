"""Pooling a sequence of token vectors (or a feature map) into one vector per input, and padding normalisation.

Pure tensor functions, shared by the taps (`hf_align.encoders`) and the sentence-transformers pipeline
(`hf_align.encoders.sentence_pipeline`). Every pooling reads the padding mask, so it gives the same vector whichever
side the tokenizer padded and however long the batch's longest sequence is.
"""

from __future__ import annotations

import torch

# Poolings of a token sequence (B, T, C) with its mask (B, T) -> (B, C); `tokens` keeps the sequence.
#   cls: the first token that is not padding (a vision CLS token, BERT's [CLS]).
#   mean / max: over the tokens that are neither padding nor prefix (CLS, register) tokens.
#   last: the last token that is not padding (decoder-only embedding models).
#   weightedmean: mean weighted by position 1, 2, ... over the real tokens (sentence-transformers' SGPT pooling).
#   mean_sqrt_len: sum / sqrt(number of real tokens) (sentence-transformers' `mean_sqrt_len_tokens`).
SEQUENCE_POOLINGS = ("cls", "mean", "max", "last", "weightedmean", "mean_sqrt_len", "tokens")


def as_token_sequence(state: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) feature maps become (B, H*W, C) token sequences; (B, T, C) passes through."""
    if state.dim() == 4:
        return state.flatten(2).transpose(1, 2)
    return state


def right_align(attention_mask: torch.Tensor, *tensors: torch.Tensor | None):
    """Move left padding to the right, row by row, so every sequence starts at position 0.

    Encoders with absolute positions (BERT, CLIP) read a left-padded sequence at shifted positions, and CLIP's pooler
    looks for the first end-of-text token, which left padding puts among the pads; after this every encoder sees each
    text as it would alone. Right-padded batches come back unchanged (the same tensors).

    Args:
        attention_mask (`torch.Tensor` of shape `(B, T)`): 1 for real tokens, 0 for padding on either side.
        *tensors (`torch.Tensor` of shape `(B, T)` or `None`): `input_ids`, `token_type_ids`, ... to move alike.

    Returns:
        `(attention_mask, *tensors)` rolled so the padding of each row is at its end.

    Raises:
        ValueError: when a row has padding between real tokens (no tokenizer pads that way).
    """
    mask = attention_mask.bool()
    leading = (~mask).int().cumprod(dim=1).sum(dim=1)  # pads before each row's first real token
    if bool(leading.any()):
        length = mask.shape[1]
        index = (torch.arange(length, device=mask.device)[None] + leading[:, None]) % length
        attention_mask = attention_mask.gather(1, index)
        tensors = tuple(None if t is None else t.gather(1, index) for t in tensors)
        mask = attention_mask.bool()
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        rows = torch.nonzero((mask[:, 1:] & ~mask[:, :-1]).any(1)).flatten().tolist()
        raise ValueError(
            f"attention_mask rows {rows[:10]} have padding between real tokens; expected padding on the left or the "
            "right only, as tokenizers produce"
        )
    return (attention_mask, *tensors)


def pool_tokens(
    tokens: torch.Tensor, pooling: str, mask: torch.Tensor | None = None, num_prefix_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pool a token sequence with one of `SEQUENCE_POOLINGS`.

    Args:
        tokens (`torch.Tensor` of shape `(B, T, C)`, or a feature map `(B, C, H, W)`, read as `(B, H*W, C)`).
        pooling (`str`): one of `SEQUENCE_POOLINGS`.
        mask (`torch.Tensor` of shape `(B, T)`, *optional*): 1 / True for real tokens; `None` = all real.
        num_prefix_tokens (`int`): leading non-patch tokens (CLS, registers) that `mean` and `max` leave out; `cls`
            needs at least one.

    Returns:
        `(features, token_mask)`: `(B, C)` and `None`, or for `tokens` the `(B, T, C)` sequence and its `(B, T)` bool
        mask.
    """
    tokens = as_token_sequence(tokens)
    real = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if mask is None else mask.bool()
    if pooling == "tokens":
        return tokens, real
    if pooling == "cls":
        first = real.int().argmax(dim=1)  # position 0 unless the row is left-padded
        return tokens[torch.arange(len(tokens), device=tokens.device), first], None
    if pooling == "last":
        last = tokens.shape[1] - 1 - real.flip(1).int().argmax(dim=1)
        return tokens[torch.arange(len(tokens), device=tokens.device), last], None
    body, body_mask = tokens[:, num_prefix_tokens:], real[:, num_prefix_tokens:]
    if pooling == "max":
        return body.masked_fill(~body_mask[..., None], float("-inf")).amax(dim=1), None
    weights = body_mask.to(body.dtype)
    if pooling == "weightedmean":
        weights = weights * weights.cumsum(dim=1)  # 1, 2, ... over the real tokens, 0 on padding
    summed = (body * weights[..., None]).sum(dim=1)
    count = weights.sum(dim=1, keepdim=True).clamp(min=1.0)
    if pooling in ("mean", "weightedmean"):
        return summed / count, None
    if pooling == "mean_sqrt_len":
        return summed / count.sqrt(), None
    raise ValueError(f"pooling must be one of {SEQUENCE_POOLINGS}, got {pooling!r}")
