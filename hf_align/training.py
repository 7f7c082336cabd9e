"""`train()`: fit an aligner on a feature cache with Accelerate (device placement, bf16, accumulation, checkpoints).

Training never runs the frozen encoders: batches are rows of the feature cache. Pooled caches are held in memory as
two tensors (a 100k × 1024 cache is 800 MB in fp32), on the GPU when they fit in a quarter of its free memory, so a
step is a gather plus a few matmuls; token caches are read from the memory-mapped Arrow file batch by batch.

Several processes (`accelerate launch`, `torchrun`; gloo on CPU): a global batch is `per_device_train_batch_size ×
num_processes` pairs and each process embeds its slice. The embeddings are all-gathered with their gradient, so every
process computes the loss of the whole global batch (InfoNCE over all its pairs, regularisers on all its features),
exactly as one process with the global batch would; averaging the processes' gradients then gives the one-process
gradient (each process's gather sends back N times its slice's share, and the terms every process computes alike
are counted once per process). The trained weights match a one-process run with `per_device_train_batch_size ×
num_processes` up to the rounding of a different summation order.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields

import datasets
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from transformers import SchedulerType, get_scheduler
from transformers.utils import logging

from .checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    remove_partial_checkpoints,
    resume_dir,
    save_checkpoint,
)
from .configuration import check_number, check_positive_int
from .distributed import cpu_process_group
from .encoders import non_finite_rows
from .features import FeatureCollator, column_array, features_for, split_by_image
from .modeling import MAX_LOGIT_SCALE, AlignerOutput
from .retrieval import chunked_retrieval_metrics

logger = logging.get_logger(__name__)


@dataclass
class AlignmentArguments:
    """Settings of `hf_align.train` (names follow `transformers.TrainingArguments` where they mean the same)."""

    output_dir: str | None = field(default=None, metadata={"help": "Where checkpoints and the final aligner go."})
    num_train_epochs: float = field(default=10.0, metadata={"help": "Epochs over the training pairs."})
    max_steps: int = field(default=-1, metadata={"help": "Optimiser steps; overrides num_train_epochs when > 0."})
    per_device_train_batch_size: int = field(default=4096, metadata={"help": "Pairs per InfoNCE batch."})
    per_device_eval_batch_size: int = field(default=4096, metadata={"help": "Pairs per evaluation batch."})
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Any transformers scheduler name."})
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
        default="eval_loss", metadata={"help": "eval_loss or eval_<retrieval metric>, e.g. eval_mean_R@1."}
    )
    save_steps: int | None = field(default=None, metadata={"help": "Checkpoint every N steps (default: at evals)."})
    save_total_limit: int = 2
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'latest' for the newest one in output_dir."}
    )
    logging_steps: int = 50
    report_to: list[str] = field(default_factory=list, metadata={"help": "Accelerate trackers (tensorboard, ...)."})
    mixed_precision: str = field(default="auto", metadata={"help": "no | bf16 | fp16 | auto (bf16 on CUDA)."})
    seed: int = 42
    init_samples: int = field(default=10000, metadata={"help": "Training pairs shown to init_from_data."})
    save_model: bool = field(default=True, metadata={"help": "save_pretrained the final aligner to output_dir."})

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
        check_number("max_grad_norm", self.max_grad_norm, low=0.0)
        check_number("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0)
        if self.lr_scheduler_type not in {s.value for s in SchedulerType}:
            raise ValueError(
                f"lr_scheduler_type must be a transformers scheduler name {sorted(s.value for s in SchedulerType)}, "
                f"got {self.lr_scheduler_type!r}"
            )
        if self.mixed_precision not in ("no", "bf16", "fp16", "auto"):
            raise ValueError(f"mixed_precision must be no, bf16, fp16 or auto, got {self.mixed_precision!r}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("give num_train_epochs > 0 or max_steps > 0")
        if not isinstance(self.metric_for_best_model, str) or not self.metric_for_best_model.startswith("eval_"):
            raise ValueError(f"metric_for_best_model must start with 'eval_', got {self.metric_for_best_model!r}")

    @property
    def greater_is_better(self) -> bool:
        return "loss" not in self.metric_for_best_model

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


class BatchSource:
    """Rows of a `features_for` view by index: in-memory tensors for pooled features (on `device` when it is a GPU
    with room for them), Arrow reads for tokens."""

    def __init__(self, view: datasets.Dataset, device: torch.device | str | None = None):
        self.view = view
        self.collate = FeatureCollator()
        ids = column_array(view, "image_id") if "image_id" in view.column_names else range(len(view))
        self.image_ids = torch.as_tensor(ids)
        sample = view[0]["vision_features"]
        self.tokens = torch.as_tensor(sample).dim() == 2 or torch.as_tensor(view[0]["text_features"]).dim() == 2
        if not self.tokens:
            columns = view.with_format("torch", columns=["vision_features", "text_features"])[:]
            self.vision = columns["vision_features"].float()
            self.text = columns["text_features"].float()
            # Checked once here (cheap, in memory) so a bad row stops the run before step 0, not at step 5,000.
            _check_finite_rows({"vision_features": self.vision, "text_features": self.text}, torch.arange(len(view)))
            device = torch.device(device or "cpu")
            # On a GPU a step's batch is then a device-side gather, not a host gather plus a host-to-device copy.
            if (
                device.type == "cuda"
                and self.vision.nbytes + self.text.nbytes <= torch.cuda.mem_get_info(device)[0] // 4
            ):
                self.vision, self.text = self.vision.to(device), self.text.to(device)
        else:
            self.numpy_view = view.with_format("numpy", columns=["vision_features", "text_features"])

    def __len__(self) -> int:
        return len(self.view)

    def fetch(self, indices: torch.Tensor) -> dict:
        if not self.tokens:
            indices = indices.to(self.vision.device, non_blocking=True)
            return {"vision_features": self.vision[indices], "text_features": self.text[indices], "return_loss": True}
        rows = self.numpy_view[indices.tolist()]
        batch = self.collate({k: list(v) for k, v in rows.items()})
        _check_finite_rows({k: batch[k] for k in ("vision_features", "text_features")}, indices)
        return batch


def _check_finite_rows(columns: dict[str, torch.Tensor], rows: torch.Tensor) -> None:
    """Refuse NaN/Inf features (one such row makes the whole batch's InfoNCE NaN), naming the cache rows."""
    for name, values in columns.items():
        bad = non_finite_rows(values)
        if bad:
            cache_rows = rows[bad].tolist()
            raise ValueError(
                f"the feature cache holds NaN or Inf in {name} of {len(bad)} row(s), e.g. rows {cache_rows[:10]}; "
                "re-extract them or drop them (features.filter / features.select) before training"
            )


def _validation_split(view: datasets.Dataset, eval_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (n_train,), (n_eval,) of the training and validation parts (`split_by_image`): all captions of one
    image fall on the same side; at least 2 validation images unless `eval_fraction` is 0."""
    try:
        train_rows, eval_rows = split_by_image(
            view, eval_fraction, seed, min_held_out=2 if eval_fraction > 0 else 0, name="eval_fraction"
        )
    except ValueError as err:
        raise ValueError(f"{err} (use eval_fraction=0 to train without validation)") from None
    return torch.from_numpy(train_rows), torch.from_numpy(eval_rows)


def train(model, features: datasets.Dataset, args: AlignmentArguments | None = None) -> TrainingResult:
    """Train `model`'s aligner on a feature cache and return what happened.

    The model's layers pick the cache columns (`features_for`); a layer set to `"auto"` is chosen first by layer
    selection on the cache. Methods with a data-dependent start (`init_from_data`) get up to `args.init_samples`
    training pairs before the first step; training-free methods stop there. The best weights on the validation split
    (by `metric_for_best_model`) are restored at the end and, with `output_dir`, saved with `save_pretrained`.

    A run killed at any point (even while writing a checkpoint) and restarted with
    `resume_from_checkpoint="latest"` continues from the last complete checkpoint and ends with exactly the weights of
    an uninterrupted run: the batch order, the RNG state (dropout), the optimiser, the scheduler, the gradient scaler
    and the best weights so far are all restored. Non-finite features are refused before the first step; a non-finite
    loss raises `FloatingPointError` naming the step and batch, leaving the checkpoints written before it intact.
    """
    args = args or AlignmentArguments()
    if not isinstance(features, datasets.Dataset):
        raise TypeError(f"features must be a datasets.Dataset feature cache, got {type(features).__name__}")
    if len(features) == 0:
        raise ValueError("features is empty: nothing to train on")
    if getattr(model, "has_encoders", False) and any(
        p.requires_grad for name in ("vision_model", "text_model") for p in getattr(model, name).parameters()
    ):
        raise ValueError(
            "this model has trainable encoder parameters (LoRA), but train() works on cached encoder features, which "
            "cannot train them; train on raw inputs with transformers.Trainer and hf_align.ImageTextCollator"
        )
    if "auto" in (model.config.vision_layer, model.config.text_layer):
        from .layer_selection import resolve_auto_layers

        resolve_auto_layers(model, features, seed=args.seed)
    set_seed(args.seed)
    accelerator = Accelerator(
        cpu=cpu_process_group(),
        # No prepared DataLoader: train() slices each global batch itself, so the scheduler steps once per step.
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        mixed_precision=_mixed_precision(args.mixed_precision),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to or None,
        project_dir=args.output_dir,
    )
    if accelerator.is_main_process:
        remove_partial_checkpoints(args.output_dir)
    view = features_for(model, features)
    train_rows, eval_rows = _validation_split(view, args.eval_fraction, args.seed)
    source = BatchSource(view, accelerator.device)
    model.to(accelerator.device)
    world = accelerator.num_processes
    global_batch = args.per_device_train_batch_size * world

    resume_from = resume_dir(args)
    if resume_from is None:
        init_from_training_rows(model, source, train_rows, args, accelerator.device)
    params = [p for p in model.parameters() if p.requires_grad]
    batches_per_epoch = math.ceil(len(train_rows) / global_batch)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    eval_steps = args.eval_steps or steps_per_epoch
    save_steps = args.save_steps or eval_steps
    state = {"global_step": 0, "history": [], "best_metric": None, "best_step": None, "bad_evals": 0}
    start = time.perf_counter()
    trainable = bool(params) and model.aligner.trainable

    if trainable:
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
        warmup = args.warmup_steps or int(args.warmup_ratio * total_steps)
        scheduler = get_scheduler(args.lr_scheduler_type, optimizer, warmup, total_steps)
        # The model is not wrapped in DDP, which would average the gradients of per-process losses: each process
        # computes the global batch's loss (`_global_batch_output`) and `_average_gradients` combines the gradients.
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        best_state = None
        if resume_from is not None:
            state, best_state = load_checkpoint(
                resume_from, accelerator.unwrap_model(model), optimizer, scheduler, accelerator.scaler
            )
            logger.info(f"resumed from {resume_from} at step {state['global_step']}")
        if args.report_to:
            accelerator.init_trackers("hf_align", config=asdict(args))
        running, micro = [], state["global_step"] * args.gradient_accumulation_steps
        order_epoch = None
        while state["global_step"] < total_steps:
            epoch, position = divmod(micro, batches_per_epoch)
            if epoch != order_epoch:  # one permutation per epoch (drawing it every step costs more than the step)
                rows, order_epoch = _epoch_order(train_rows, args.seed, epoch), epoch
            batch_rows = rows[position * global_batch : (position + 1) * global_batch]
            batch = _to_device(source.fetch(batch_rows), accelerator.device)
            model.train()
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    output = model(**batch) if world == 1 else _global_batch_output(model, batch, accelerator)
                loss = output.loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite training loss {loss.item()} at step {state['global_step']} (epoch {epoch}, "
                        f"batch {position}, first rows {batch_rows[:8].tolist()}); terms: "
                        f"{ {k: v.item() for k, v in output.loss_terms.items()} }. The last good checkpoint is "
                        f"{latest_checkpoint(args.output_dir)}"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and world > 1:
                    _average_gradients(params, world)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            micro += 1
            running.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            accelerator.unwrap_model(model).aligner.after_optimizer_step()
            state["global_step"] += 1
            step = state["global_step"]
            if step % args.logging_steps == 0 or step == total_steps:
                log = {"step": step, "epoch": micro / batches_per_epoch, "loss": torch.stack(running).mean().item()}
                log.update({f"loss_{k}": v.item() for k, v in output.loss_terms.items()})
                log["learning_rate"] = scheduler.get_last_lr()[0]
                log.update(_diagnostics(accelerator.unwrap_model(model)))
                running = []
                _record(state, log, accelerator)
            if len(eval_rows) and (step % eval_steps == 0 or step == total_steps):
                metrics = evaluate_on_rows(accelerator.unwrap_model(model), source, eval_rows, args)
                _record(state, {"step": step, **metrics}, accelerator)
                if _improved(state, metrics, args):
                    state.update(best_metric=metrics[args.metric_for_best_model], best_step=step, bad_evals=0)
                    best_state = _aligner_state(accelerator.unwrap_model(model))
                else:
                    state["bad_evals"] += 1
            if args.output_dir and (step % save_steps == 0 or step == total_steps):
                save_checkpoint(args, accelerator, model, optimizer, scheduler, state, best_state)
            patience = args.early_stopping_patience
            if patience is not None and state["bad_evals"] >= patience:
                logger.info(f"early stopping at step {step}: {patience} evaluations without improvement")
                break
        model = accelerator.unwrap_model(model)
        if best_state is not None:
            model.load_state_dict(best_state, strict=False)
        accelerator.end_training()
    final = evaluate_on_rows(model, source, eval_rows, args) if len(eval_rows) else {}
    runtime = time.perf_counter() - start
    _summarise(model, args, state, final, len(train_rows), len(eval_rows), runtime, accelerator)
    if args.output_dir and args.save_model and accelerator.is_main_process:
        model.save_pretrained(args.output_dir)
    losses = [h["loss"] for h in state["history"] if "loss" in h]
    return TrainingResult(
        state["global_step"], losses[-1] if losses else float("nan"), final, state["history"], runtime, args.output_dir
    )


@torch.no_grad()
def evaluate_on_rows(model, source: BatchSource, rows: torch.Tensor, args: AlignmentArguments) -> dict:
    """Validation loss (mean over eval batches) and retrieval recall@k on the held-out rows."""
    model.eval()
    device = model.logit_scale.device
    losses, images, texts = [], [], []
    for start in range(0, len(rows), args.per_device_eval_batch_size):
        batch = _to_device(source.fetch(rows[start : start + args.per_device_eval_batch_size]), device)
        output = model(**batch)
        losses.append(output.loss.float() * len(output.image_embeds))
        images.append(output.image_embeds)
        texts.append(output.text_embeds)
    image_embeds, text_embeds = torch.cat(images), torch.cat(texts)
    unique, owner = torch.unique(source.image_ids[rows], return_inverse=True)
    first = torch.zeros(len(unique), dtype=torch.long).scatter_(0, owner.flip(0), torch.arange(len(owner)).flip(0))
    # In blocks: a large validation split's (n_images, n_texts) score matrix would not fit in memory.
    recall = chunked_retrieval_metrics(
        image_embeds[first.to(device)], text_embeds, owner.to(device), similarity=model.similarity
    )
    metrics = {"eval_loss": (torch.stack(losses).sum() / len(rows)).item()}
    metrics.update({f"eval_{k}": v for k, v in recall.items()})
    return metrics


# ---------------------------------------------------------------------------------------------- several processes
def _global_batch_output(model, batch: dict, accelerator: Accelerator) -> AlignerOutput:
    """This process's share of a global batch's forward pass; the loss is the whole global batch's.

    The process embeds rows `[n·r/N, n·(r+1)/N)` of the (n, ...) global batch, the embeddings of all N processes are
    gathered with their gradient (`_gather_rows`, in rank order: the global batch's order), and the logits and every
    loss term are computed on the whole batch, with the global batch's features for the regularisers. Every process
    gets the same loss; `_average_gradients` turns the processes' gradients into the one-process gradient.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    n = batch["vision_features"].shape[0]
    bounds = [n * r // world for r in range(world + 1)]
    local = {k: v[bounds[rank] : bounds[rank + 1]] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    image_embeds = _gather_rows(
        model.get_image_features(vision_features=local["vision_features"], vision_mask=local.get("vision_mask")), bounds
    )
    text_embeds = _gather_rows(
        model.get_text_features(text_features=local["text_features"], text_mask=local.get("text_mask")), bounds
    )
    logits = model.similarity(image_embeds, text_embeds) * model.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    terms = model.loss_terms(batch["vision_features"], batch["text_features"], image_embeds, text_embeds, logits)
    return AlignerOutput(
        loss=torch.stack(list(terms.values())).sum(),
        logits_per_image=logits,
        logits_per_text=logits.t(),
        image_embeds=image_embeds,
        text_embeds=text_embeds,
        loss_terms=terms,
    )


class _GatherRows(torch.autograd.Function):
    """All-gather of (B_r, ...) rows padded to a common B; backward sums the gradient of the gathered tensor over
    the processes (each computed the same loss from it) and returns this process's rows."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, padded_rows: int) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), local.shape[0]
        padded = torch.cat([local, local.new_zeros((padded_rows - local.shape[0], *local.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, padded.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank, : ctx.rows], None


def _gather_rows(local: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """(bounds[r+1] - bounds[r], ...) rows from each process r -> all (bounds[-1], ...) rows in rank order."""
    sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    parts = _GatherRows.apply(local, max(sizes))
    return torch.cat([parts[r, :size] for r, size in enumerate(sizes)])


def _average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Replace each gradient by its mean over the processes, in one all-reduce of the concatenated gradients."""
    with_grad = [p for p in params if p.grad is not None]  # None on every process alike (same loss graph)
    if not with_grad:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in with_grad])
    dist.all_reduce(flat)
    flat /= world
    for p, chunk in zip(with_grad, flat.split([p.numel() for p in with_grad])):
        p.grad.copy_(chunk.view_as(p.grad))


# ---------------------------------------------------------------------------------------------- helpers
def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _epoch_order(rows: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    # A fixed permutation per (seed, epoch): a resumed run sees exactly the batches the interrupted one would have.
    return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 100003 + epoch))]


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def init_from_training_rows(model, source: BatchSource, train_rows, args, device) -> None:
    """Give the method its data-dependent start from up to `args.init_samples` training rows (seeded order)."""
    rows = _epoch_order(train_rows, args.seed, -1)[: args.init_samples]
    batch = _to_device(source.fetch(rows), device)
    model.aligner.init_from_data(
        batch["vision_features"],
        batch["text_features"],
        seed=args.seed,
        vision_mask=batch.get("vision_mask"),
        text_mask=batch.get("text_mask"),
    )


def _diagnostics(model) -> dict:
    report = getattr(model.aligner, "diagnostics", None)
    return {f"diag_{k}": float(v) for k, v in report().items()} if callable(report) else {}


def _record(state: dict, entry: dict, accelerator: Accelerator) -> None:
    state["history"].append(entry)
    logger.info(json.dumps(entry))
    accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=entry["step"])


def _improved(state: dict, metrics: dict, args: AlignmentArguments) -> bool:
    if args.metric_for_best_model not in metrics:
        raise ValueError(f"metric_for_best_model={args.metric_for_best_model!r} is not among {sorted(metrics)}")
    value, best = metrics[args.metric_for_best_model], state["best_metric"]
    return best is None or (value > best if args.greater_is_better else value < best)


def _aligner_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.aligner_state_dict().items()}


def _summarise(model, args, state, final, n_train, n_eval, runtime, accelerator) -> None:
    """Record the run on the model's card data (kept in the config); the model card is written from it."""
    logs = {}
    for entry in state["history"]:
        row = logs.setdefault(entry["step"], {"epoch": round(entry.get("epoch", 0.0), 4), "step": entry["step"]})
        if "loss" in entry:
            row["training_loss"] = entry["loss"]
        if "eval_loss" in entry:
            row["validation_loss"] = entry["eval_loss"]
    card = model.model_card_data
    card.start_training_run()  # what an earlier fit or evaluations of the old weights recorded no longer applies
    card.set_training_run(
        trainer="hf_align.train",
        train_pairs=n_train,
        eval_pairs=n_eval,
        global_step=state["global_step"],
        best_step=state["best_step"],
        runtime_s=runtime,
        device=accelerator.device,
        mixed_precision=accelerator.mixed_precision,
        training_args=args.non_default(),
        final_eval=final,
        training_logs=list(logs.values()),
    )


__all__ = [
    "AlignmentArguments",
    "BatchSource",
    "TrainingResult",
    "evaluate_on_rows",
    "init_from_training_rows",
    "split_by_image",
    "train",
]
