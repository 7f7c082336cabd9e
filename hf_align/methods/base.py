"""The contract every aligner method implements (PEFT-style: one module per method, its config beside its model)."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..utils.registry import ComponentConfig


@dataclass
class MethodConfig(ComponentConfig):
    """Base class of a method's settings. Subclasses are dataclasses whose fields declare their checks with their
    defaults (`hf_align.utils.checks`: `positive_int(512)`, `number(0.1, low=0.0)`, ...), run on construction;
    `from_kwargs` also rejects unknown keys by name and values of the wrong type."""


class AlignerMethod(nn.Module, abc.ABC):
    """A trainable (or training-free) map from frozen encoder features to a shared embedding space.

    Subclasses set `config_class`, and implement `embed_image` / `embed_text`. The model L2-normalises what they
    return, scores pairs with its similarity head and trains with symmetric InfoNCE plus `extra_loss`.

    Class attributes:
        input_kind: `"pooled"` (one vector per sample, shape (B, d)) or `"tokens"` (a sequence (B, T, d) + mask (B, T)).
        trainable: `False` for training-free methods (training only runs `init_from_data`).
        citation: BibTeX entries (separated by blank lines) of the papers the method implements; the model card of
            an aligner built with it renders them. Empty when there is nothing to cite.
        regularizer_input_kind: what the regularisers (STRUCTURE) get from `regularizer_features`: `None` = the
            method's own `input_kind`; `"pooled"` for a token method that pools its tokens for them.

    Instance attribute `embed_dim`: width D of the embeddings `embed_image` / `embed_text` return (set by subclasses).
    Instance attribute `vision_num_prefix_tokens`: leading CLS / register tokens of a vision token sequence (0 for a
    CNN's spatial grid); `AlignerModel` sets it from its config, for methods that treat the CLS apart from the patches.
    """

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    input_kind: ClassVar[str] = "pooled"
    trainable: ClassVar[bool] = True
    citation: ClassVar[str] = ""
    regularizer_input_kind: ClassVar[str | None] = None

    def __init__(self, config: MethodConfig, vision_dim: int, text_dim: int):
        super().__init__()
        self.config = config
        self.vision_dim = vision_dim
        self.text_dim = text_dim
        self.embed_dim: int | None = None
        self.vision_num_prefix_tokens = 1

    @abc.abstractmethod
    def embed_image(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, d_v) pooled features, or (B, T, d_v) tokens with mask (B, T) -> (B, D) embeddings (unnormalised)."""

    @abc.abstractmethod
    def embed_text(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, d_t) pooled features, or (B, T, d_t) tokens with mask (B, T) -> (B, D) embeddings (unnormalised)."""

    def extra_loss(
        self,
        vision_features: torch.Tensor,
        text_features: torch.Tensor,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Method-specific loss terms added to InfoNCE during training (name -> already weighted scalar)."""
        return {}

    def regularizer_features(self, modality: str, features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The frozen features the regularisers compare the embeddings with (STRUCTURE's reference space); default:
        the method's inputs. A token method with `regularizer_input_kind = "pooled"` returns (B, d') vectors pooled as
        its forward pools its tokens (`mask` None = every token real)."""
        return features

    def init_from_data(
        self,
        vision_features: torch.Tensor,
        text_features: torch.Tensor,
        seed: int = 0,
        vision_mask: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> None:
        """Data-dependent initialisation (anchors, codebooks) from training pairs; default: nothing.

        `train()` calls it once, before the first step, with up to `AlignmentArguments.init_samples` training pairs:
        (N, d) pooled features, or (N, T, d) tokens with (N, T) masks for token methods.
        """

    def after_optimizer_step(self) -> None:
        """Called after each optimiser step (EMA teachers and the like)."""

    def training_state(self) -> dict[str, torch.Tensor]:
        """Tensors a training checkpoint needs beyond `state_dict()` (e.g. an EMA teacher that inference never uses)
        so that a resumed run matches an uninterrupted one; default: none."""
        return {}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `training_state()` returned, after the weights are loaded."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no training state, got keys {sorted(state)}")

    def reset_parameters(self) -> None:
        """(Re-)initialise parameters held directly by this method. `post_init` visits every submodule, so children
        with their own `reset_parameters` (nn.Linear, ...) are reset separately; default: nothing of its own."""


def check_token_input(method: str, modality: str, tokens: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Shapes only (no host-device sync in a training step): (B, T, d) tokens and, if given, a (B, T) mask."""
    if tokens.dim() != 3:
        raise ValueError(
            f"{method} needs {modality} token features (B, T, d); got shape {tuple(tokens.shape)}. Use "
            f"{modality}_pooling='tokens' and a feature cache with token columns"
        )
    if mask is not None and tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise ValueError(f"{method}: {modality} mask has shape {tuple(mask.shape)}, expected {tuple(tokens.shape[:2])}")
