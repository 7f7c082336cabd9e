"""STRUCTURE regularisation (docs/methods.md §3): keep, in the aligned space, the neighbourhood structure each frozen
encoder had.

For one modality with frozen batch features X (B, d) and their aligned embeddings A = f(X) (B, D):

1. rows are L2-normalised, then (with `centering=True`) the batch mean is subtracted;
2. `P_X = softmax_row(X Xᵀ / τ)` (the diagonal is kept), likewise `P_A`; level l compares the l-th matrix powers
   `P_X^l`, `P_A^l` (random walks of l hops on the batch similarity graph). With `image_ids`, rows i ≠ j showing the
   same image (several captions of one image in the batch) get transition probability 0 to each other in both
   matrices, so both spaces compare the same neighbour sets;
3. the level divergence is the mean over rows of either the variant the authors' code computes
   (`divergence="authors_rkl"`, the default: ½ [KL(M‖P_A) + KL(M‖P_X)], M = ½(P_X + P_A), "reverse" KLs from the
   mixture, not bounded by ln 2; λ = 10 was tuned on it), computed as their code does it, with a floor ε = 1e-12
   added to every probability: Σ_j (m + ε)(log(m + ε) − log(q + ε)); or the same divergence without the floor,
   from exact log-probabilities (`divergence="exact_rkl"`: the two differ only where a transition probability falls
   below about 1e-12, and there the exact one keeps the gradient the floor flattens); or the Jensen–Shannon
   divergence (`divergence="js"`, ½ KL(P_X‖M) + ½ KL(P_A‖M), natural log, in [0, ln 2]);
4. `R_S = (1/L) Σ_l w_l · relu(D_l − margin)` with `w_l = 1/l` (`weighting="inverse"`, the default, as the authors'
   configurations with L > 1) or `1` (`"none"`); the two agree at L = 1.

`levels`: an int L means the L levels 1, 2, …, L; a list of ints names the matrix powers explicitly (e.g. `[1, 3]`),
and 1/L then divides by its length. `STRUCTURE_PRESETS` holds the authors' four configurations (`L1`, `L2`, `L3`,
`L5`), selected with `preset="L3"` (`structure_preset="L3"`).

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
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import same_image_mask
from .base import Regularizer, RegularizerConfig
from .registry import register_regularizer

WEIGHTINGS = ("none", "inverse")
# warmup_steps="auto": λ ramps up over this share of the run's training forward calls (docs/methods.md, "Defaults")
AUTO_WARMUP_FRACTION = 0.1
# weight="auto": λ by the method the term is bound to, the authors' 10 for any other. The trained MLP branch (§2)
# follows the frozen geometry at λ 10 at the expense of the contrastive fit: λ 1 measured best of 10 / 5 / 2.5 / 1 on
# the digits (docs/methods.md, "Defaults"); the authors' MLP had its branch gated off, i.e. was linear.
AUTO_WEIGHTS = {"mlp": 1.0}
AUTHORS_WEIGHT = 10.0
FALLBACK_WARMUP_STEPS = 1000  # "auto" when nothing announced the run's length: the authors' warm-up
DIVERGENCES = ("authors_rkl", "exact_rkl", "js")
AUTHORS_EPS = 1e-12  # the floor the authors' structure_reg adds to every probability before its logs
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

__all__ = [
    "DIVERGENCES",
    "STRUCTURE_PRESETS",
    "WEIGHTINGS",
    "StructureConfig",
    "StructureRegularizer",
    "structure_regularizer",
]


def _check_levels(levels) -> list[int]:
    if isinstance(levels, int) and not isinstance(levels, bool):
        if levels < 1:
            raise ValueError(
                f"levels must be a positive int (the number of levels) or a list of powers, got {levels!r}"
            )
        return list(range(1, levels + 1))
    if isinstance(levels, Sequence) and not isinstance(levels, str) and levels:
        out = list(levels)
        if all(isinstance(l, int) and not isinstance(l, bool) and l >= 1 for l in out) and len(set(out)) == len(out):
            return out
    raise ValueError(
        f"levels must be a positive int (levels 1..L) or a non-empty list of distinct positive ints, got {levels!r}"
    )


def _check_options(tau, weighting, margin, divergence) -> None:
    if not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite float > 0, got {tau!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not (
        isinstance(margin, (int, float)) and not isinstance(margin, bool) and math.isfinite(margin) and margin >= 0
    ):
        raise ValueError(f"margin must be a finite float >= 0, got {margin!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def _check_pooled(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2:
        kind = "token features (B, T, d)" if x.dim() == 3 else f"a tensor of shape {tuple(x.shape)}"
        raise ValueError(
            f"STRUCTURE regularisation needs pooled features, one vector per sample (B, d); {name} is {kind}. "
            "Use it with a pooled method (cls/mean pooling), not a token method"
        )


def _log_transitions(
    x: torch.Tensor, tau: float, centering: bool, powers: list[int], same: torch.Tensor | None
) -> dict[int, torch.Tensor]:
    """log P^l for every requested power l, P = softmax_row(x̂ x̂ᵀ / τ): (B, B) each, float32.

    `same` (B, B) bool marks the pairs that get transition probability 0 (log P = −∞ at level 1). Level 1 comes
    straight from log_softmax (exact even where P underflows); higher powers take the log of the matrix power, clamped
    at the smallest normal float so a zero entry gives a large finite log rather than −∞.
    """
    x = F.normalize(x.float(), dim=1)
    if centering:
        x = x - x.mean(dim=0, keepdim=True)
    logits = x @ x.T / tau
    if same is not None:
        logits = logits.masked_fill(same, float("-inf"))  # the diagonal is never masked: every row stays finite
    log_p = torch.log_softmax(logits, dim=1)
    out = {1: log_p} if 1 in powers else {}
    if max(powers) > 1:
        p = power = log_p.exp()
        for level in range(2, max(powers) + 1):
            power = power @ p
            if level in powers:
                out[level] = power.clamp_min(torch.finfo(power.dtype).tiny).log()
    return out


def _row_divergence(
    log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, ignore: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over rows of JS(p, q) or ½[KL(m‖q) + KL(m‖p)], m = ½(p + q) (`exact_rkl`; `authors_rkl` the same with
    `AUTHORS_EPS` added to m, p and q before the logs, as the authors' code); inputs are (B, B) log-probabilities.

    `ignore` (B, B) bool marks entries where both p and q are exactly 0 (log −∞): they contribute 0. They are set to
    log 1 in both first, which makes every term there exactly 0 (p = q = m) and keeps −∞ − (−∞) = NaN out of the
    values and the gradients.
    """
    if ignore is not None:
        log_p, log_q = log_p.masked_fill(ignore, 0.0), log_q.masked_fill(ignore, 0.0)
    p, q = log_p.exp(), log_q.exp()
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    if divergence == "js":
        per_row = 0.5 * (p * (log_p - log_m)).sum(1) + 0.5 * (q * (log_q - log_m)).sum(1)
    elif divergence == "authors_rkl":
        m = 0.5 * (p + q) + AUTHORS_EPS
        per_row = 0.5 * (m * (m.log() - (q + AUTHORS_EPS).log())).sum(1) + 0.5 * (
            m * (m.log() - (p + AUTHORS_EPS).log())
        ).sum(1)
    else:
        m = log_m.exp()
        per_row = 0.5 * (m * (log_m - log_q)).sum(1) + 0.5 * (m * (log_m - log_p)).sum(1)
    return per_row.mean()


def structure_regularizer(
    frozen: torch.Tensor,
    aligned: torch.Tensor,
    levels: int | Sequence[int] = 1,
    tau: float = 0.05,
    weighting: str = "inverse",
    margin: float = 0.0,
    divergence: str = "authors_rkl",
    centering: bool = True,
    image_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """R_S for one modality: how much the aligned batch geometry departs from the frozen one (a scalar, >= 0).

    Args:
        frozen: (B, d) frozen features of the batch (no gradient flows into them).
        aligned: (B, D) aligned embeddings of the same B samples (any D; normalised here).
        levels: number of levels L (powers 1..L) or an explicit list of powers.
        tau: softmax temperature of the transition matrices.
        weighting: `inverse` (w_l = 1/l, the default) or `none` (w_l = 1).
        margin: divergence below which a level costs nothing (`relu(D_l − margin)`).
        divergence: `authors_rkl` (½[KL(M‖P_A) + KL(M‖P_X)] with the authors' 1e-12 floor, the default),
            `exact_rkl` (the same without the floor) or `js` (Jensen–Shannon).
        centering: subtract the batch mean after L2 normalisation.
        image_ids: optional (B,) image id of each sample; samples i ≠ j with the same id get transition probability 0
            to each other in both P_X and P_A. `None`: every pair is a neighbour candidate.

    Returns 0 (up to rounding) when `aligned` equals `frozen` up to a rotation and an isotropic scale.
    """
    powers = _check_levels(levels)
    _check_options(tau, weighting, margin, divergence)
    _check_pooled("frozen", frozen)
    _check_pooled("aligned", aligned)
    if frozen.shape[0] != aligned.shape[0]:
        raise ValueError(
            f"frozen and aligned must hold the same samples: got {frozen.shape[0]} and {aligned.shape[0]} rows"
        )
    if frozen.shape[0] < 2:
        raise ValueError(f"STRUCTURE needs a batch of at least 2 samples, got {frozen.shape[0]}")
    same = None if image_ids is None else same_image_mask(image_ids.to(aligned.device), aligned.shape[0])
    with torch.no_grad():
        log_frozen = _log_transitions(frozen, tau, centering, powers, None if same is None else same.to(frozen.device))
    log_aligned = _log_transitions(aligned, tau, centering, powers, same)
    total = aligned.new_zeros((), dtype=torch.float32)
    for level in powers:
        weight = 1.0 if weighting == "none" else 1.0 / level
        # Only level 1 holds exact zeros at the masked pairs; powers reach them through other samples.
        ignore = same if level == 1 else None
        value = _row_divergence(log_frozen[level].to(aligned.device), log_aligned[level], divergence, ignore)
        total = total + weight * torch.relu(value - margin)
    return total / len(powers)


@dataclass
class StructureConfig(RegularizerConfig):
    """Settings of the `structure` regulariser (`AlignerModel.from_encoders(..., regularizers={"structure": {...}})`
    or the shorthand `structure_<field>=...`).

    weight: λ, or `"auto"` (the default): `AUTO_WEIGHTS` by method (1 for `mlp`), else the authors' 10, resolved
    when the model binds the term to its method (`bind_method`). warmup_steps: training forward calls over which λ
    ramps up linearly from 0 (0 = full weight at once; `"auto"`, the default: `AUTO_WARMUP_FRACTION` of the run, see
    the module docstring). preset: one of `STRUCTURE_PRESETS` (`L1`, `L2`, `L3`, `L5`, the authors'
    configurations): every field left at its default takes the preset's value; a field given another value than the
    preset's is a `ValueError`. The other fields are those of `structure_regularizer`.
    """

    weight: float | str = "auto"
    levels: int | list[int] = 1
    tau: float = 0.05
    weighting: str = "inverse"
    margin: float = 0.0
    divergence: str = "authors_rkl"
    centering: bool = True
    warmup_steps: int | str = "auto"
    preset: str | None = None

    def __post_init__(self):
        if self.preset is not None:
            self._apply_preset()
        if self.weight != "auto" and not (
            isinstance(self.weight, (int, float)) and not isinstance(self.weight, bool) and self.weight >= 0
        ):
            raise ValueError(f"structure weight must be a float >= 0 or 'auto', got {self.weight!r}")
        if self.warmup_steps != "auto" and not (
            isinstance(self.warmup_steps, int) and not isinstance(self.warmup_steps, bool) and self.warmup_steps >= 0
        ):
            raise ValueError(f"structure warmup_steps must be an int >= 0 or 'auto', got {self.warmup_steps!r}")
        if not isinstance(self.centering, bool):
            raise ValueError(f"structure centering must be a bool, got {self.centering!r}")
        _check_levels(self.levels)
        _check_options(self.tau, self.weighting, self.margin, self.divergence)

    def _apply_preset(self) -> None:
        if self.preset not in STRUCTURE_PRESETS:
            raise ValueError(
                f"structure preset must be one of {sorted(STRUCTURE_PRESETS)} or None, got {self.preset!r}"
            )
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
        self.method: str | None = None  # the aligner method the term regularises, once bound

    def bind_method(self, method: str) -> None:
        """Record the aligner method the term regularises (what `weight="auto"` depends on); the model's
        configuration does it when the model is built."""
        self.method = method

    @property
    def weight(self) -> float:
        """λ: `config.weight`, or what `"auto"` gives for the bound method (the authors' 10 when unbound)."""
        if self.config.weight != "auto":
            return float(self.config.weight)
        return AUTO_WEIGHTS.get(self.method, AUTHORS_WEIGHT)

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
        _check_pooled("vision_features", vision_features)
        _check_pooled("text_features", text_features)
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
