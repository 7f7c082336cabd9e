"""The STRUCTURE regulariser `"structure"` (docs/methods.md §3): the loss term of `hf_align.functional.structure`
added to training.

The registered regulariser `"structure"` adds `λ_t · ½ (R_S(image) + R_S(text))` to the training loss, with the
frozen tapped-layer features and the aligned embeddings of the batch, and `λ_t = weight · min(1, t / warmup_steps)`.
`warmup_steps="auto"` (the default) is `AUTO_WARMUP_FRACTION` of the run's training forward calls, which
`hf_align.train` (and `AlignerTrainer`) announce through `set_training_length` before the first step: a fixed 1,000
calls (the authors' value, kept by the presets) is longer than a whole run on a few thousand pairs, where λ would
never reach its weight. A loop that announces nothing warms up over `FALLBACK_WARMUP_STEPS`.
The counter t is a persistent buffer (`steps_done`, saved in checkpoints and `save_pretrained`): it advances by one
at every forward call made in training mode, and t is its value before that increment, so the k-th training batch
uses `weight · min(1, (k − 1) / warmup_steps)` and the first batch has no STRUCTURE term, as in the authors' code
(their loss steps its schedule before the forward pass). Eval-mode calls use the full `weight` and leave the counter
alone, so validation losses of different epochs measure the same objective; `hf_align.train` also logs the validation
loss at the scheduled weight (`eval_loss_scheduled`), the figure the authors' curves show. One forward call per
optimisation step is what `hf_align.train` does without gradient accumulation; with `gradient_accumulation_steps = g`
the counter sees g calls per step, so pass `warmup_steps = 1000·g` to warm up over 1000 optimiser steps (`"auto"`
counts them itself).

The regulariser needs pooled features (one vector per sample); token sequences (B, T, d) are rejected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..functional.structure import (
    check_levels,
    check_options,
    check_pooled,
    structure_regularizer,
)
from ..utils.checks import flag, nonnegative_int, number, one_of
from .base import Regularizer, RegularizerConfig
from .registry import register_regularizer

# warmup_steps="auto": λ ramps up over this share of the run's training forward calls. The whole run: on a few
# thousand pairs a λ at full weight for most of the run pulls the aligned space to the frozen geometry at the expense
# of the contrastive fit; ramped over the run (and with the best weights by the validation loss) linear + STRUCTURE
# measured 90.2 against 85.7 with 10 % (docs/methods.md, "Defaults").
AUTO_WARMUP_FRACTION = 1.0
AUTHORS_WEIGHT = 10.0  # weight="auto"
FALLBACK_WARMUP_STEPS = 1000  # "auto" when nothing announced the run's length: the authors' warm-up
# The authors' four configurations (their configs/losses_{lin,mlp}/clip_structure_*.yaml): λ 10 warmed up over 1000
# steps, τ 0.05, no margin, their divergence; L = 1 without level weighting (the same as inverse at L = 1), L > 1 with
# inverse weighting.
_AUTHORS = dict(weight=AUTHORS_WEIGHT, warmup_steps=1000, tau=0.05, margin=0.0, divergence="authors_rkl")
STRUCTURE_PRESETS: dict[str, dict] = {
    "L1": {**_AUTHORS, "levels": 1, "weighting": "none"},
    "L2": {**_AUTHORS, "levels": 2, "weighting": "inverse"},
    "L3": {**_AUTHORS, "levels": 3, "weighting": "inverse"},
    "L5": {**_AUTHORS, "levels": 5, "weighting": "inverse"},
}

__all__ = ["STRUCTURE_PRESETS", "StructureConfig", "StructureRegularizer"]


@dataclass
class StructureConfig(RegularizerConfig):
    """Settings of the `structure` regulariser (`AlignerModel.from_encoders(..., regularizers={"structure": {...}})`
    or the shorthand `structure_<field>=...`).

    weight: λ, or `"auto"` (the default): the authors' 10. warmup_steps: training forward calls over which λ
    ramps up linearly from 0 (0 = full weight at once; `"auto"`, the default: `AUTO_WARMUP_FRACTION` of the run, see
    the module docstring). preset: one of `STRUCTURE_PRESETS` (`L1`, `L2`, `L3`, `L5`, the authors'
    configurations): every field left at its default takes the preset's value; a field given another value than the
    preset's is a `ValueError`. The other fields are those of `structure_regularizer`.
    """

    check_prefix = "structure "

    weight: float | str = number("auto", low=0.0, also=("auto",), expected="a float >= 0 or 'auto'")
    levels: int | list[int] = 1
    tau: float = 0.05
    weighting: str = "inverse"
    margin: float = 0.0
    divergence: str = "authors_rkl"
    centering: bool = flag(True, expected="a bool")
    warmup_steps: int | str = nonnegative_int("auto", also=("auto",))
    preset: str | None = one_of(
        None, (None, *sorted(STRUCTURE_PRESETS)), expected=f"one of {sorted(STRUCTURE_PRESETS)} or None"
    )

    def __post_init__(self):
        super().__post_init__()
        if self.preset is not None:
            self._apply_preset()
        # levels, tau, weighting, margin and divergence: the checks `structure_regularizer` runs on its arguments
        check_levels(self.levels)
        check_options(self.tau, self.weighting, self.margin, self.divergence)

    def _apply_preset(self) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, value in STRUCTURE_PRESETS[self.preset].items():
            given = getattr(self, name)
            if given == defaults[name]:
                setattr(self, name, value)
            elif given != value:
                raise ValueError(
                    f"structure preset {self.preset!r} sets {name}={value!r}, but {name}={given!r} was given: "
                    "drop one of them"
                )

    def function_kwargs(self) -> dict:
        return dict(
            levels=self.levels,
            tau=self.tau,
            weighting=self.weighting,
            margin=self.margin,
            divergence=self.divergence,
            centering=self.centering,
        )


@register_regularizer("structure")
class StructureRegularizer(Regularizer):
    """`λ · ½ (R_S(vision features, image embeds) + R_S(text features, text embeds))`, λ warmed up in training and
    full in evaluation; see the module docstring."""

    config_class = StructureConfig
    citation = """@inproceedings{groger2025structure,
  title         = {With Limited Data for Multimodal Alignment, Let the {STRUCTURE} Guide You},
  author        = {Gr{\\"o}ger, Fabian and Wen, Shuo and Le, Huyen and Brbi{\\'c}, Maria},
  booktitle     = {The Thirty-ninth Annual Conference on Neural Information Processing Systems},
  year          = {2025},
  url           = {https://openreview.net/forum?id=IkvQqD7hk3},
  eprint        = {2506.16895},
  archivePrefix = {arXiv}
}"""

    def __init__(self, config: StructureConfig):
        super().__init__(config)
        # Training forward calls seen so far (the warm-up clock); a persistent buffer, so checkpoints carry it.
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.training_length: int | None = None  # training forward calls of the run, when announced

    @property
    def weight(self) -> float:
        """λ: `config.weight`, or the authors' 10 for `"auto"`."""
        return AUTHORS_WEIGHT if self.config.weight == "auto" else float(self.config.weight)

    def set_training_length(self, forward_calls: int) -> None:
        """Announce how many training forward calls the run makes (what `warmup_steps="auto"` is a share of)."""
        if not isinstance(forward_calls, int) or isinstance(forward_calls, bool) or forward_calls < 1:
            raise ValueError(
                f"structure training length must be a positive int of forward calls, got {forward_calls!r}"
            )
        self.training_length = forward_calls

    @property
    def warmup_steps(self) -> int:
        """The warm-up in training forward calls: `config.warmup_steps`, or what `"auto"` makes of the run's length."""
        if self.config.warmup_steps != "auto":
            return self.config.warmup_steps
        if self.training_length is None:
            return FALLBACK_WARMUP_STEPS
        return max(1, round(AUTO_WARMUP_FRACTION * self.training_length))

    def reset_parameters(self) -> None:
        # nn.init keeps transformers' guard: a counter loaded from a checkpoint is not reset by post-load init.
        nn.init.zeros_(self.steps_done)

    def schedule_fraction(self) -> float:
        return self.current_weight() / self.weight if self.weight else 1.0

    def current_weight(self) -> float:
        """λ_t, the training weight for the counter's present value (evaluation always uses the full `weight`)."""
        warmup = self.warmup_steps
        ramp = 1.0 if warmup == 0 else min(1.0, int(self.steps_done) / warmup)
        return self.weight * ramp

    def forward(
        self,
        vision_features: torch.Tensor,
        text_features: torch.Tensor,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        image_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_pooled("vision_features", vision_features)
        check_pooled("text_features", text_features)
        weight = self.current_weight() if self.training else self.weight
        if self.training:
            self.steps_done += 1
        if weight == 0.0:  # λ = 0: nothing to compute
            return image_embeds.new_zeros((), dtype=torch.float32)
        options = self.config.function_kwargs()
        value = 0.5 * (
            structure_regularizer(vision_features, image_embeds, image_ids=image_ids, **options)
            + structure_regularizer(text_features, text_embeds, image_ids=image_ids, **options)
        )
        return weight * value
