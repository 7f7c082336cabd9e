"""The contract of a regulariser (a loss term that composes with any aligner with trainable maps) and its settings."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..utils.registry import ComponentConfig


@dataclass
class RegularizerConfig(ComponentConfig):
    """Base class of a regulariser's settings. Subclasses are dataclasses whose fields declare their checks with
    their defaults (`hf_align.utils.checks`), run on construction; `from_kwargs` also rejects unknown keys by name and
    values of the wrong type."""


class Regularizer(nn.Module, abc.ABC):
    """One loss term computed from the frozen features of a batch and their aligned embeddings.

    Class attributes:
        config_class: the settings dataclass (a `RegularizerConfig` subclass).
        input_kinds: which method inputs (`AlignerMethod.input_kind`) the term is defined for; checked when the
            model is configured.
        citation: BibTeX entries (separated by blank lines) of the papers the term implements; the model card of an
            aligner trained with it renders them. Empty when there is nothing to cite.
    """

    config_class: ClassVar[type[RegularizerConfig]] = RegularizerConfig
    input_kinds: ClassVar[tuple[str, ...]] = ("pooled",)
    citation: ClassVar[str] = ""

    def __init__(self, config: RegularizerConfig):
        super().__init__()
        self.config = config

    def schedule_fraction(self) -> float:
        """The share of its full weight the term has in training now (a warm-up below 1); evaluation always uses the
        full weight. `hf_align.train` logs the validation loss at this share too (`eval_loss_scheduled`)."""
        return 1.0

    @abc.abstractmethod
    def forward(
        self,
        vision_features: torch.Tensor,
        text_features: torch.Tensor,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        image_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the weighted scalar term.

        Args:
            vision_features: the batch's frozen tapped-layer vision features, (B, d_v).
            text_features: the batch's frozen tapped-layer text features, (B, d_t).
            image_embeds: their aligned image outputs, (B, D).
            text_embeds: their aligned text outputs, (B, D).
            image_ids: optional (B,) image id of each pair. A term that compares samples with each other must not
                treat two rows with the same id (captions of one image) as different samples, e.g. by masking those
                pairs; `None` means every row is its own image.
        """
