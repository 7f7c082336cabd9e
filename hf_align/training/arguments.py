"""`AlignmentArguments`, the settings of `hf_align.train` (checked when made, before any cache is read),
`TrainingPlan`, what those settings come to on a given cache (`plan_training`), and `TrainingResult`, what a run
returns. All are importable from `hf_align.training` too.

Out of the box (`AlignmentArguments(output_dir=...)` and nothing else) the batch and the length of the run follow the
number of training rows N (`auto_batch_size`, `plan_training`): the batch is the power of two at or below N / 4,
within [32, 4096] (so an epoch has at least 4 steps), and the run lasts about `AUTO_STEP_BUDGET` optimiser steps, at
most `MAX_AUTO_EPOCHS` epochs. With a validation split it is evaluated `AUTO_EVALUATIONS` times and stops after a
quarter of its evaluations (at least `DEFAULT_EARLY_STOPPING_PATIENCE`) without a better validation retrieval score
(`eval_rsum`); the best weights are restored. docs/methods.md ("Defaults") has the sweep these numbers come from.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass, field, fields

from transformers import SchedulerType
from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION

from ..utils.checks import check_number, check_positive_int
from .batches import CAPTION_SAMPLING
from .streamed_batches import DEFAULT_SHUFFLE_BUFFER_SIZE
from .tracking import check_report_to

__all__ = ["AlignmentArguments", "TrainingPlan", "TrainingResult", "auto_batch_size", "plan_training"]

# The automatic batch and run length (measured: docs/methods.md, "Defaults"; benchmarks/sweep_defaults.py).
MIN_AUTO_BATCH, MAX_AUTO_BATCH = 32, 4096
AUTO_BATCH_FRACTION = 4  # the batch is at most a quarter of the training rows: an epoch has at least 4 steps
AUTO_STEP_BUDGET = 1000  # optimiser steps of an automatic-length run ...
MAX_AUTO_EPOCHS = 100  # ... unless that would take more epochs than this (small data: early stopping ends it)
AUTO_EVALUATIONS = 20  # validations of an automatic-length run
DEFAULT_EARLY_STOPPING_PATIENCE = 5  # evaluations without improvement before stopping, when a validation split exists


@dataclass
class AlignmentArguments:
    """Settings of `hf_align.train` (names follow `transformers.TrainingArguments` where they mean the same)."""

    output_dir: str | None = field(default=None, metadata={"help": "Where checkpoints and the final aligner go."})
    num_train_epochs: float | None = field(
        default=None,
        metadata={
            "help": "Epochs over the training images (over every row with caption_sampling=all); default: about "
            f"{AUTO_STEP_BUDGET} steps, at most {MAX_AUTO_EPOCHS} epochs."
        },
    )
    max_steps: int = field(default=-1, metadata={"help": "Optimiser steps; overrides num_train_epochs when > 0."})
    per_device_train_batch_size: int | None = field(
        default=None,
        metadata={
            "help": f"Pairs per InfoNCE batch; default: the power of two at or below 1/{AUTO_BATCH_FRACTION} of the "
            f"training rows, in [{MIN_AUTO_BATCH}, {MAX_AUTO_BATCH}]."
        },
    )
    per_device_eval_batch_size: int = field(default=4096, metadata={"help": "Pairs per evaluation batch."})
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Any transformers scheduler name."})
    # `dict | str | None` as in TrainingArguments: the CLI hands a JSON string (a recipe's mapping arrives as one too),
    # turned into a dict in __post_init__.
    lr_scheduler_kwargs: dict | str | None = field(
        default=None, metadata={"help": 'The schedule\'s own arguments (JSON), e.g. {"num_cycles": 10.5} for cosine.'}
    )
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    eval_fraction: float = field(
        default=0.1, metadata={"help": "Share of images (with all their captions) held out for validation; 0 = none."}
    )
    eval_steps: int | None = field(
        default=None,
        metadata={
            "help": f"Evaluate every N steps (default: each epoch; {AUTO_EVALUATIONS} times in a run of automatic "
            "length)."
        },
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop after N evaluations without improvement (the best weights are restored either way); "
            "default: a quarter of the run's evaluations (at least "
            f"{DEFAULT_EARLY_STOPPING_PATIENCE}) when there is a validation split; 0 = never stop early."
        },
    )
    metric_for_best_model: str = field(
        default="auto",
        metadata={
            "help": "What picks the best weights and early stopping: eval_rsum (R@1 + R@5 + R@10 both ways), "
            "eval_<retrieval metric> (eval_mean_R@1, ...), eval_<term> (e.g. eval_infonce), eval_loss (every term "
            "at full weight) or auto (default): eval_loss when the model has regularisers (the STRUCTURE authors' "
            "criterion, the objective the user asked for), else eval_rsum."
        },
    )
    caption_sampling: str = field(
        default="auto",
        metadata={
            "help": "Rows of an epoch: per_epoch (each image once, a caption drawn afresh each epoch), first (each "
            "image with its first caption), all (every caption row), auto (per_epoch when an image has several "
            "captions, else all)."
        },
    )
    mask_same_image: bool = field(
        default=True,
        metadata={"help": "Captions of the same image in a batch are not each other's negatives (loss, regularisers)."},
    )
    save_steps: int | None = field(default=None, metadata={"help": "Checkpoint every N steps (default: at evals)."})
    save_total_limit: int = 2
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'latest' for the newest one in output_dir."}
    )
    logging_steps: int = 50
    report_to: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Accelerate trackers to log to (tensorboard, wandb, mlflow, trackio, ...; installed ones only): "
            "loss terms, learning rate, temperature, diagnostics, evaluations, the layer-selection heatmap."
        },
    )
    mixed_precision: str = field(default="auto", metadata={"help": "no | bf16 | fp16 | auto (bf16 on CUDA)."})
    seed: int = 42
    init_samples: int = field(default=10000, metadata={"help": "Training pairs shown to init_from_data."})
    save_model: bool = field(default=True, metadata={"help": "save_pretrained the final aligner to output_dir."})
    # None: stream when the pooled features take over a quarter of the available memory (`training_batches`)
    stream_features: bool | None = field(default=None, metadata={"help": "Stream batches from the cache's files."})
    torch_compile: bool = field(
        default=False,
        metadata={"help": "torch.compile the model's forward pass (features to loss) for the training steps."},
    )
    shuffle_buffer_size: int = field(default=DEFAULT_SHUFFLE_BUFFER_SIZE, metadata={"help": "Rows streamed draw from."})

    def __post_init__(self):
        # Everything is checked here, before a cache is read or a step runs: a bad value found at step 5,000 (or a
        # logging_steps=0 division, a save_total_limit=0 that deletes the checkpoint just written) loses work.
        positive = (
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "save_total_limit",
            "init_samples",
            "shuffle_buffer_size",
        )
        for name in positive:
            check_positive_int(name, getattr(self, name))
        for name in ("per_device_train_batch_size", "eval_steps", "save_steps"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name), "None (automatic) or a positive int")
        patience = self.early_stopping_patience
        if patience is not None and (not isinstance(patience, int) or isinstance(patience, bool) or patience < 0):
            raise ValueError(
                f"early_stopping_patience must be None (automatic), 0 (never stop early) or a positive int, got "
                f"{patience!r}"
            )
        for name in ("max_steps", "warmup_steps", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if self.num_train_epochs is not None:
            check_number("num_train_epochs", self.num_train_epochs)
        check_number("eval_fraction", self.eval_fraction, low=0.0, high=1.0, high_inclusive=False)
        check_number("learning_rate", self.learning_rate, low=0.0, low_inclusive=False)
        check_number("weight_decay", self.weight_decay, low=0.0)
        check_number("adam_beta1", self.adam_beta1, low=0.0, high=1.0, high_inclusive=False)
        check_number("adam_beta2", self.adam_beta2, low=0.0, high=1.0, high_inclusive=False)
        check_number("adam_epsilon", self.adam_epsilon, low=0.0, low_inclusive=False)
        check_number("max_grad_norm", self.max_grad_norm, low=0.0)
        check_number("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0)
        if self.lr_scheduler_type not in {s.value for s in SchedulerType}:
            raise ValueError(
                f"lr_scheduler_type must be a transformers scheduler name {sorted(s.value for s in SchedulerType)}, "
                f"got {self.lr_scheduler_type!r}"
            )
        self.lr_scheduler_kwargs = _scheduler_kwargs(self.lr_scheduler_type, self.lr_scheduler_kwargs)
        if self.caption_sampling not in CAPTION_SAMPLING:
            raise ValueError(f"caption_sampling must be one of {CAPTION_SAMPLING}, got {self.caption_sampling!r}")
        if not isinstance(self.mask_same_image, bool):
            raise ValueError(f"mask_same_image must be True or False, got {self.mask_same_image!r}")
        if not isinstance(self.torch_compile, bool):
            raise ValueError(f"torch_compile must be True or False, got {self.torch_compile!r}")
        if not isinstance(self.stream_features, (bool, type(None))):
            raise ValueError(f"stream_features must be None (automatic), True or False, got {self.stream_features!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16", "auto"):
            raise ValueError(f"mixed_precision must be no, bf16, fp16 or auto, got {self.mixed_precision!r}")
        if self.max_steps <= 0 and self.num_train_epochs is not None and self.num_train_epochs <= 0:
            raise ValueError("give num_train_epochs > 0, max_steps > 0 or neither (automatic length)")
        metric = self.metric_for_best_model
        if not isinstance(metric, str) or not (metric == "auto" or metric.startswith("eval_")):
            raise ValueError(f"metric_for_best_model must be 'auto' or start with 'eval_', got {metric!r}")
        self.report_to = check_report_to(self.report_to, self.output_dir)

    @property
    def greater_is_better(self) -> bool | None:
        """Whether `metric_for_best_model` grows with quality; `None` for `"auto"`, which each run resolves
        (`TrainingPlan.greater_is_better`)."""
        return None if self.metric_for_best_model == "auto" else greater_is_better(self.metric_for_best_model)

    def non_default(self) -> dict:
        """The settings that differ from the defaults (what a model card should mention)."""
        defaults = AlignmentArguments()
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(defaults, f.name)
        }


def auto_batch_size(rows: int) -> int:
    """The automatic global batch for `rows` training rows per epoch: the power of two at or below
    `rows / AUTO_BATCH_FRACTION`, within [`MIN_AUTO_BATCH`, `MAX_AUTO_BATCH`], and never above `rows` (128 for 1,000
    rows, 2048 for 10,000, 4096 for 100,000)."""
    check_positive_int("rows", rows)
    power = 1 << max(0, (rows // AUTO_BATCH_FRACTION).bit_length() - 1)
    return min(rows, max(MIN_AUTO_BATCH, min(MAX_AUTO_BATCH, power)))


@dataclass(frozen=True)
class TrainingPlan:
    """What `AlignmentArguments` come to on a cache: the batch, the length and the evaluations of the run.

    `batch_size` is per device (the global batch is `batch_size × num_processes`); `auto` names the settings that
    were chosen from the data rather than given.
    """

    batch_size: int
    total_steps: int
    steps_per_epoch: int
    eval_steps: int
    early_stopping_patience: int  # 0: no early stopping
    metric_for_best_model: str
    auto: tuple[str, ...]

    @property
    def greater_is_better(self) -> bool:
        return greater_is_better(self.metric_for_best_model)

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch

    def describe(self, n_train: int, n_eval: int, world: int = 1) -> str:
        """The one line `train()` logs before the first step."""
        batch = self.batch_size * world
        stopping = (
            f"early stopping on {self.metric_for_best_model} (patience {self.early_stopping_patience} evaluations)"
            if self.early_stopping_patience
            else "no early stopping"
        )
        validation = (
            f"best weights by {self.metric_for_best_model} on {n_eval} validation rows, evaluated every "
            f"{self.eval_steps} steps, {stopping}"
            if n_eval
            else "no validation split (eval_fraction=0): no early stopping, the last weights are kept"
        )
        chosen = f" (automatic: {', '.join(self.auto)})" if self.auto else ""
        return (
            f"training {self.total_steps} steps ({self.epochs:.3g} epochs of {self.steps_per_epoch} steps) at batch "
            f"{batch} on {n_train} rows{chosen}; {validation}"
        )


def greater_is_better(metric: str) -> bool:
    """Retrieval recalls (`eval_*R@k`, `eval_rsum`) grow with quality; `eval_loss` and each loss term shrink."""
    return "R@" in metric or metric == "eval_rsum"


def plan_training(
    args: AlignmentArguments,
    rows_per_epoch: int,
    world: int = 1,
    has_validation: bool = True,
    has_regularizers: bool = False,
):
    """The `TrainingPlan` of `args` for `rows_per_epoch` training rows and `world` processes.

    Left unset, the batch is `auto_batch_size(rows_per_epoch)` (split over the processes) and the run takes
    `min(MAX_AUTO_EPOCHS, max(1, AUTO_STEP_BUDGET / steps_per_epoch))` epochs, evaluated `AUTO_EVALUATIONS` times;
    given epochs or `max_steps` keep one evaluation per epoch. Early stopping is on whenever there is a validation
    split, unless `early_stopping_patience=0`, with a patience of a quarter of the run's evaluations, at least
    `DEFAULT_EARLY_STOPPING_PATIENCE`. `metric_for_best_model="auto"` is `eval_loss` for a model with regularisers
    (`has_regularizers`), else `eval_rsum`: on the digits, linear + STRUCTURE restored by `eval_rsum` kept weights
    from early in the run, 5 points below those `eval_loss` keeps (docs/methods.md, "Defaults").
    """
    auto = []
    batch = args.per_device_train_batch_size
    if batch is None:
        batch = max(1, auto_batch_size(rows_per_epoch) // world)
        auto.append("batch")
    batches_per_epoch = math.ceil(rows_per_epoch / (batch * world))
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_steps > 0:
        total_steps = args.max_steps
    elif args.num_train_epochs is not None:
        total_steps = math.ceil(args.num_train_epochs * steps_per_epoch)
    else:
        epochs = min(MAX_AUTO_EPOCHS, max(1.0, AUTO_STEP_BUDGET / steps_per_epoch))
        total_steps = math.ceil(epochs * steps_per_epoch)
        auto.append("length")
    eval_steps = args.eval_steps
    if eval_steps is None:
        eval_steps = max(1, total_steps // AUTO_EVALUATIONS) if "length" in auto else steps_per_epoch
    patience = args.early_stopping_patience
    if patience is None:
        # a quarter of the run's evaluations without improvement, and at least DEFAULT_EARLY_STOPPING_PATIENCE (a
        # small validation split is noisy: per-epoch evaluations of a long run would otherwise stop it at random)
        evaluations = math.ceil(total_steps / eval_steps)
        patience = max(DEFAULT_EARLY_STOPPING_PATIENCE, math.ceil(evaluations / 4)) if has_validation else 0
        auto.append("early stopping" if has_validation else "no early stopping")
    metric = args.metric_for_best_model
    if metric == "auto":
        metric = "eval_loss" if has_regularizers else "eval_rsum"
    return TrainingPlan(
        batch_size=batch,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        eval_steps=eval_steps,
        early_stopping_patience=patience if has_validation else 0,
        metric_for_best_model=metric,
        auto=tuple(auto),
    )


@dataclass
class TrainingResult:
    """What `train()` returns. `metrics`: the final evaluation of the kept weights on the validation split (empty
    without one). `best_step` / `best_metric`: the evaluation whose weights were kept, by `metric_for_best_model`
    (None without validation). `early_stopped`: whether early stopping ended the run before `total_steps`."""

    global_step: int
    training_loss: float
    metrics: dict  # the best (or last) evaluation
    history: list  # one dict per logging / evaluation event
    train_runtime: float  # seconds
    output_dir: str | None
    total_steps: int | None = None
    best_step: int | None = None
    best_metric: float | None = None
    metric_for_best_model: str | None = None
    early_stopped: bool = False

    def summary(self) -> str:
        """The one line `train()` logs at the end."""
        if self.total_steps == 0:
            return "set up without training steps (a training-free method); no validation score kept"
        if self.best_step is None:
            kept = "no validation split: kept the last weights"
        else:
            kept = f"best {self.metric_for_best_model} {self.best_metric:.4g} at step {self.best_step} (restored)"
        stopped = "early stopping fired" if self.early_stopped else "ran to the end"
        return f"trained {self.global_step} of {self.total_steps} steps in {self.train_runtime:.1f}s; {kept}; {stopped}"


def _scheduler_kwargs(scheduler: str, kwargs) -> dict:
    """`lr_scheduler_kwargs` as a dict (None -> {}, a JSON object string -> its dict), checked against the
    arguments the transformers schedule named `scheduler` takes, so a typo fails before any work."""
    if kwargs is None:
        return {}
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(f"lr_scheduler_kwargs must be a JSON object, got {kwargs!r} ({err})") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"lr_scheduler_kwargs must be a dict (or a JSON object), got {kwargs!r}")
    parameters = inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(scheduler)]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(kwargs)  # the schedule takes any keywords itself
    # get_scheduler passes these itself; what is left is the schedule's own (none for the constant ones, whose
    # get_scheduler branch would drop any silently)
    accepted = sorted(set(parameters) - {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"})
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"lr_scheduler_kwargs has {unknown}, which lr_scheduler_type={scheduler!r} does not take; it takes "
            f"{accepted or 'none'}"
        )
    return dict(kwargs)
