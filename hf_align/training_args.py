"""`AlignmentArguments`, the settings of `hf_align.train` (checked when made, before any cache is read), and
`TrainingResult`, what a run returns. Both are importable from `hf_align.training` too."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field, fields

from transformers import SchedulerType
from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION

from .batches import CAPTION_SAMPLING
from .configuration import check_number, check_positive_int
from .streamed_batches import DEFAULT_SHUFFLE_BUFFER_SIZE
from .tracking import check_report_to

__all__ = ["AlignmentArguments", "TrainingResult"]


@dataclass
class AlignmentArguments:
    """Settings of `hf_align.train` (names follow `transformers.TrainingArguments` where they mean the same)."""

    output_dir: str | None = field(default=None, metadata={"help": "Where checkpoints and the final aligner go."})
    num_train_epochs: float = field(
        default=10.0, metadata={"help": "Epochs over the training images (over every row with caption_sampling=all)."}
    )
    max_steps: int = field(default=-1, metadata={"help": "Optimiser steps; overrides num_train_epochs when > 0."})
    per_device_train_batch_size: int = field(default=4096, metadata={"help": "Pairs per InfoNCE batch."})
    per_device_eval_batch_size: int = field(default=4096, metadata={"help": "Pairs per evaluation batch."})
    learning_rate: float = 1e-3
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
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N steps (default: each epoch)."})
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after N evaluations without improvement; best weights are kept."}
    )
    metric_for_best_model: str = field(
        default="eval_loss",
        metadata={
            "help": "eval_loss (every term at full weight), eval_<term> (e.g. eval_infonce) or eval_<retrieval "
            "metric> (e.g. eval_mean_R@1)."
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
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "save_total_limit",
            "init_samples",
            "shuffle_buffer_size",
        )
        for name in positive:
            check_positive_int(name, getattr(self, name))
        for name in ("eval_steps", "save_steps", "early_stopping_patience"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name), "None or a positive int")
        for name in ("max_steps", "warmup_steps", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
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
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("give num_train_epochs > 0 or max_steps > 0")
        if not isinstance(self.metric_for_best_model, str) or not self.metric_for_best_model.startswith("eval_"):
            raise ValueError(f"metric_for_best_model must start with 'eval_', got {self.metric_for_best_model!r}")
        self.report_to = check_report_to(self.report_to, self.output_dir)

    @property
    def greater_is_better(self) -> bool:
        # Retrieval recalls (eval_*R@k) grow with quality; eval_loss and each loss term (eval_infonce, ...) shrink.
        return "R@" in self.metric_for_best_model

    def non_default(self) -> dict:
        """The settings that differ from the defaults (what a model card should mention)."""
        defaults = AlignmentArguments()
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(defaults, f.name)
        }


@dataclass
class TrainingResult:
    global_step: int
    training_loss: float
    metrics: dict  # the best (or last) evaluation
    history: list  # one dict per logging / evaluation event
    train_runtime: float  # seconds
    output_dir: str | None


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
