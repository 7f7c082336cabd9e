"""`train()`: fit an aligner on a feature cache with Accelerate (device placement, bf16, accumulation, checkpoints).

Training never runs the frozen encoders: batches are rows of the feature cache. Pooled caches that fit in a quarter of
the available memory are held there as two tensors (on the GPU when they fit in a quarter of its free memory), so a
step is a gather plus a few matmuls; larger ones are streamed from the cache's Arrow files (`stream_features`). Token
caches are held in memory when they fit too, else read from the memory-mapped Arrow files batch by batch.

Several processes (`accelerate launch`, `torchrun`; gloo on CPU): a global batch is `per_device_train_batch_size ×
num_processes` pairs and each process embeds its slice. The embeddings are all-gathered with their gradient, so every
process computes the loss of the whole global batch (InfoNCE over all its pairs, regularisers on all its features),
exactly as one process with the global batch would; averaging the processes' gradients then gives the one-process
gradient (each process's gather sends back N times its slice's share, and the terms every process computes alike
are counted once per process). The trained weights match a one-process run with `per_device_train_batch_size ×
num_processes` up to the rounding of a different summation order.
"""

from __future__ import annotations

import contextlib
import json
import math
import time

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
from transformers import get_scheduler
from transformers.utils import logging

from ..features import features_for, split_by_image
from ..functional.retrieval import chunked_retrieval_metrics
from ..model.modeling import MAX_LOGIT_SCALE, AlignerModel, AlignerOutput
from ..utils.cpu_threads import follow_load, scoped_cpu_threads
from ..utils.distributed import average_gradients, cpu_process_group, gather_rows
from .arguments import AlignmentArguments, TrainingPlan, TrainingResult, plan_training
from .batches import CaptionSampler
from .checkpoints import (
    latest_checkpoint,
    load_aligner_state,
    load_checkpoint,
    remove_partial_checkpoints,
    resume_dir,
    save_checkpoint,
)
from .streamed_batches import RowSource, training_batches
from .tracking import log_layer_selection, logged_values, tracker_config

logger = logging.get_logger(__name__)


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


@scoped_cpu_threads
def train(model: AlignerModel, features: datasets.Dataset, args: AlignmentArguments | None = None) -> TrainingResult:
    """Train `model`'s aligner on a feature cache and return what happened.

    The model's layers pick the cache columns (`features_for`); a layer set to `"auto"` is chosen first by layer
    selection on the cache. An epoch visits each training image once with one of its captions, drawn afresh every epoch,
    when the cache holds several captions per image (`caption_sampling`, `hf_align.training.batches`); captions of one
    image that meet in a batch are not each other's negatives (`mask_same_image`). Methods with a data-dependent start
    (`init_from_data`) get up to `args.init_samples` training pairs before the first step; training-free methods stop
    there. Left unset, the batch, the length of the run and its evaluations follow the number of training rows
    (`plan_training`), logged in one line before the first step. The best weights on the validation split (by
    `metric_for_best_model`; by default `eval_loss` for a model with regularisers, else `eval_rsum`: R@1 + R@5 + R@10
    both ways) are restored at the end and, with `output_dir`, saved with `save_pretrained`; with a validation split the
    run stops early after `early_stopping_patience` evaluations without improvement. The returned `TrainingResult` (and
    one line of the log) says how many steps ran, the best step and score, and whether early stopping fired.

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
            "cannot train them; train on raw inputs with transformers.Trainer and "
            "hf_align.encoders.lora.ImageTextCollator"
        )
    selection = None
    if "auto" in (model.config.vision_layer, model.config.text_layer):
        from .layer_selection import resolve_auto_layers

        selection = resolve_auto_layers(model, features, seed=args.seed)
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
    source = training_batches(view, accelerator.device, args.stream_features, args.shuffle_buffer_size)
    sampler = CaptionSampler(train_rows, source.image_ids[train_rows], args.caption_sampling, args.seed)
    mask_train = args.mask_same_image and sampler.repeats_images  # one caption per image: no pair to mask
    model.to(accelerator.device)
    world = accelerator.num_processes
    plan = plan_training(
        args,
        sampler.rows_per_epoch,
        world,
        has_validation=len(eval_rows) > 0,
        has_regularizers=bool(model.regularizers),
    )
    global_batch = plan.batch_size * world
    if model.aligner.trainable:  # InfoNCE needs negatives; a training-free method only reads the rows
        sampler.check_negatives(global_batch, mask_train)

    resume_from = resume_dir(args)
    if resume_from is None:
        init_from_training_rows(model, source, sampler, args, accelerator.device)
    params = [p for p in model.parameters() if p.requires_grad]
    batches_per_epoch = math.ceil(sampler.rows_per_epoch / global_batch)
    total_steps, eval_steps = plan.total_steps, plan.eval_steps
    save_steps = args.save_steps or eval_steps
    schedule_regularizers(model, total_steps * args.gradient_accumulation_steps)
    state = {"global_step": 0, "history": [], "best_metric": None, "best_step": None, "bad_evals": 0}
    early_stopped = False
    start = time.perf_counter()
    trainable = bool(params) and model.aligner.trainable
    if accelerator.is_main_process:  # what was chosen, in one line a user sees
        logger.warning(
            plan.describe(len(train_rows), len(eval_rows), world)
            if trainable
            else f"{model.config.method} is training-free: set up from {len(train_rows)} training rows, no steps"
        )

    if trainable:
        optimizer = build_optimizer(params, args)
        warmup = args.warmup_steps or int(args.warmup_ratio * total_steps)
        scheduler = get_scheduler(
            args.lr_scheduler_type, optimizer, warmup, total_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs
        )
        # The model is not wrapped in DDP, which would average the gradients of per-process losses: each process
        # computes the global batch's loss (`_global_batch_output`) and `average_gradients` combines the gradients.
        # One process without fp16 loss scaling or DeepSpeed: the optimiser and scheduler are stepped directly, gated on
        # `sync_gradients` here as Accelerate's wrappers would gate them; the wrappers cost host time every step
        # (file-system lookups in `AcceleratedOptimizer.step`) and add nothing else there.
        direct = world == 1 and accelerator.scaler is None and accelerator.distributed_type != DistributedType.DEEPSPEED
        if not direct:
            optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        best_state = None
        if resume_from is not None:
            state, best_state = load_checkpoint(
                resume_from, accelerator.unwrap_model(model), optimizer, scheduler, accelerator.scaler
            )
            logger.info(f"resumed from {resume_from} at step {state['global_step']}")
        if args.report_to:
            accelerator.init_trackers("hf_align", config=tracker_config(args))
            if selection is not None:
                log_layer_selection(accelerator, selection, state["global_step"])
        # The losses since the last logging step, summed on the device (read back once, when logged).
        loss_sum, window_steps, micro = None, 0, state["global_step"] * args.gradient_accumulation_steps
        # Losses are checked for NaN/Inf in windows of steps (one host-device sync per window, not per step), and
        # always before logging, evaluating or saving, so non-finite weights are never evaluated or saved.
        unchecked, check_every = [], min(args.logging_steps, 50)
        order_epoch = None
        unwrapped = accelerator.unwrap_model(model)
        model.train()  # once: evaluate_on_rows sets eval mode, and train mode is restored after it
        # One process: the forward (features to loss) compiled when asked; the optimiser step and the bookkeeping
        # stay eager. Several processes run `_global_batch_output`'s gathers eagerly.
        forward = torch.compile(model) if args.torch_compile and world == 1 else model
        # Accelerate's accumulate() only counts micro-batches; without accumulation every step syncs gradients.
        accumulating = args.gradient_accumulation_steps > 1
        while state["global_step"] < total_steps:
            epoch, position = divmod(micro, batches_per_epoch)
            if epoch != order_epoch:  # one draw per epoch (drawing it every step costs more than the step)
                epoch_batches = source.epoch_batches(sampler, epoch, global_batch, position, mask_train)
                order_epoch = epoch
            batch_rows, batch = next(epoch_batches)
            batch = _to_device(batch, accelerator.device)
            with accelerator.accumulate(model) if accumulating else contextlib.nullcontext():
                with accelerator.autocast():
                    # Non-finite features were refused at load (or as read): no per-forward check (a sync each).
                    if world == 1:
                        output = forward(**batch, check_finite=False)
                    else:
                        output = _global_batch_output(model, batch, accelerator)
                loss = output.loss
                if direct:
                    (loss / args.gradient_accumulation_steps).backward()  # what accelerator.backward does here
                else:
                    accelerator.backward(loss)
                if accelerator.sync_gradients and world > 1:
                    average_gradients(params, world)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    if direct:
                        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                    else:
                        accelerator.clip_grad_norm_(params, args.max_grad_norm)
                if accelerator.sync_gradients or not direct:  # the wrappers skip accumulation steps themselves
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
            micro += 1
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            window_steps += 1
            terms = {k: v.detach() for k, v in output.loss_terms.items()}
            unchecked.append((loss.detach(), terms, state["global_step"], epoch, position, batch_rows))
            if not accelerator.sync_gradients:
                continue
            unwrapped.aligner.after_optimizer_step()
            follow_load()  # torch's CPU threads follow the machine's load (hf_align.utils.cpu_threads)
            state["global_step"] += 1
            step = state["global_step"]
            if (
                len(unchecked) >= check_every * args.gradient_accumulation_steps
                or step % args.logging_steps == 0
                or step == total_steps
                or (len(eval_rows) and step % eval_steps == 0)
                or (args.output_dir and step % save_steps == 0)
            ):
                _check_losses(unchecked, args.output_dir)
            if step % args.logging_steps == 0 or step == total_steps:
                log = {"step": step, "epoch": micro / batches_per_epoch}
                log.update(logged_values(loss_sum / window_steps, output.loss_terms, unwrapped.logit_scale))
                log["learning_rate"] = scheduler.get_last_lr()[0]
                log.update(_diagnostics(unwrapped))
                loss_sum, window_steps = None, 0
                _record(state, log, accelerator)
            if len(eval_rows) and (step % eval_steps == 0 or step == total_steps):
                metrics = evaluate_on_rows(unwrapped, source, eval_rows, args)
                model.train()
                _record(state, {"step": step, **metrics}, accelerator)
                if _improved(state, metrics, plan):
                    state.update(best_metric=metrics[plan.metric_for_best_model], best_step=step, bad_evals=0)
                    best_state = _aligner_state(unwrapped)
                else:
                    state["bad_evals"] += 1
            if args.output_dir and (step % save_steps == 0 or step == total_steps):
                save_checkpoint(args, accelerator, model, optimizer, scheduler, state, best_state)
            patience = plan.early_stopping_patience
            if patience and state["bad_evals"] >= patience:
                logger.info(f"early stopping at step {step}: {patience} evaluations without improvement")
                early_stopped = True
                break
        model = accelerator.unwrap_model(model)
        if best_state is not None:
            load_aligner_state(model, best_state, "the best weights of this run")
        accelerator.end_training()
    final = evaluate_on_rows(model, source, eval_rows, args) if len(eval_rows) else {}
    runtime = time.perf_counter() - start
    _summarise(model, args, state, final, len(train_rows), len(eval_rows), runtime, accelerator)
    if args.output_dir and args.save_model and accelerator.is_main_process:
        model.save_pretrained(args.output_dir)
    losses = [h["loss"] for h in state["history"] if "loss" in h]
    result = TrainingResult(
        state["global_step"],
        losses[-1] if losses else float("nan"),
        final,
        state["history"],
        runtime,
        args.output_dir,
        total_steps=total_steps if trainable else 0,
        best_step=state["best_step"],
        best_metric=state["best_metric"],
        metric_for_best_model=plan.metric_for_best_model if len(eval_rows) else None,
        early_stopped=early_stopped,
    )
    if accelerator.is_main_process:
        logger.warning(result.summary())
    return result


@torch.no_grad()
def evaluate_on_rows(model, source: RowSource, rows: torch.Tensor, args: AlignmentArguments) -> dict:
    """Validation loss and retrieval recall@k on the held-out rows (every caption of every held-out image).

    The model runs in eval mode, where every loss term has its full weight (a regulariser's warm-up does not apply),
    so `eval_loss` measures the same objective at every evaluation; `eval_loss_scheduled` is the same loss with each
    regulariser at its scheduled training weight (during a warm-up). Returns `eval_loss`, each term as
    `eval_<term>` (`eval_infonce`, `eval_structure`, ...; means over rows, weighted like `eval_loss`) and
    `eval_<retrieval metric>` (`eval_mean_R@1`, ...). With `args.mask_same_image` captions of one image are not
    each other's negatives.
    """
    model.eval()
    device = model.logit_scale.device
    sums, images, texts = {}, [], []
    for start in range(0, len(rows), args.per_device_eval_batch_size):
        part = rows[start : start + args.per_device_eval_batch_size]
        batch = _to_device(source.fetch(part, with_image_ids=args.mask_same_image), device)
        output = model(**batch, check_finite=False)  # the source refused non-finite rows (at load or as read)
        for name, value in {"loss": output.loss, **output.loss_terms}.items():
            sums[name] = sums.get(name, 0.0) + value.float() * len(output.image_embeds)
        images.append(output.image_embeds)
        texts.append(output.text_embeds)
    image_embeds, text_embeds = torch.cat(images), torch.cat(texts)
    unique, owner = torch.unique(source.image_ids[rows], return_inverse=True)
    first = torch.zeros(len(unique), dtype=torch.long).scatter_(0, owner.flip(0), torch.arange(len(owner)).flip(0))
    # In blocks: a large validation split's (n_images, n_texts) score matrix would not fit in memory.
    recall = chunked_retrieval_metrics(
        image_embeds[first.to(device)], text_embeds, owner.to(device), similarity=model.similarity
    )
    metrics = {f"eval_{name}": (total / len(rows)).item() for name, total in sums.items()}
    # The loss with each regulariser at its scheduled training weight (the authors' validation figure during warm-up).
    metrics["eval_loss_scheduled"] = metrics["eval_loss"] - sum(
        metrics[f"eval_{name}"] * (1.0 - regularizer.schedule_fraction())
        for name, regularizer in model.regularizers.items()
    )
    metrics.update({f"eval_{k}": v for k, v in recall.items()})
    # R@1 + R@5 + R@10 both ways (the retrieval literature's rsum, out of 600): it keeps moving where R@10 saturates
    # (a small validation split) and where identical captions tie at R@1 (class-name captions)
    metrics["eval_rsum"] = sum(v for k, v in recall.items() if not k.startswith("mean_"))
    return metrics


def _check_losses(unchecked: list, output_dir: str | None) -> None:
    """Raise `FloatingPointError` naming the first step of `unchecked` whose loss is NaN/Inf, with one host-device
    sync for them all; else empty the list. Entries: (loss, detached loss terms, step, epoch, batch, batch rows)."""
    if not unchecked:
        return
    finite = torch.isfinite(torch.stack([entry[0] for entry in unchecked]))
    if not bool(finite.all()):
        loss, terms, step, epoch, position, batch_rows = unchecked[int(torch.nonzero(~finite)[0])]
        raise FloatingPointError(
            f"non-finite training loss {loss.item()} at step {step} (epoch {epoch}, batch {position}, first rows "
            f"{batch_rows[:8].tolist()}); terms: { {k: v.item() for k, v in terms.items()} }. The last good "
            f"checkpoint is {latest_checkpoint(output_dir)}"
        )
    unchecked.clear()


# ---------------------------------------------------------------------------------------------- several processes
def _global_batch_output(model, batch: dict, accelerator: Accelerator) -> AlignerOutput:
    """This process's share of a global batch's forward pass; the loss is the whole global batch's.

    The process embeds rows `[n·r/N, n·(r+1)/N)` of the (n, ...) global batch, the embeddings of all N processes are
    gathered with their gradient (`gather_rows`, in rank order: the global batch's order), and the logits and every
    loss term are computed on the whole batch, with the global batch's features for the regularisers. Every process
    gets the same loss; `average_gradients` turns the processes' gradients into the one-process gradient.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    n = batch["vision_features"].shape[0]
    bounds = [n * r // world for r in range(world + 1)]
    local = {k: v[bounds[rank] : bounds[rank + 1]] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    # The source refused non-finite rows (at load, or as read): no per-forward check.
    image_embeds = model.get_image_features(
        vision_features=local["vision_features"], vision_mask=local.get("vision_mask"), check_finite=False
    )
    text_embeds = model.get_text_features(
        text_features=local["text_features"], text_mask=local.get("text_mask"), check_finite=False
    )
    image_embeds, text_embeds = gather_rows(image_embeds, bounds), gather_rows(text_embeds, bounds)
    scale = model.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    logits = model.similarity.score_unit_norm(image_embeds, text_embeds) * scale
    terms = model.loss_terms(
        batch["vision_features"],
        batch["text_features"],
        image_embeds,
        text_embeds,
        logits,
        batch.get("image_ids"),
        vision_mask=batch.get("vision_mask"),  # token methods pool the regulariser's features by these
        text_mask=batch.get("text_mask"),
    )
    return AlignerOutput(
        loss=torch.stack(list(terms.values())).sum(),
        logits_per_image=logits,
        logits_per_text=logits.t(),
        image_embeds=image_embeds,
        text_embeds=text_embeds,
        loss_terms=terms,
    )


# ---------------------------------------------------------------------------------------------- helpers
def build_optimizer(params: list[torch.nn.Parameter], args: AlignmentArguments) -> torch.optim.AdamW:
    """AdamW over `params` with the arguments' learning rate, weight decay, betas and epsilon."""
    return torch.optim.AdamW(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
    )


def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def init_from_training_rows(model, source: RowSource, sampler: CaptionSampler, args, device) -> None:
    """Give the method its data-dependent start from up to `args.init_samples` training rows: those of the sampler's
    epoch −1 (one caption per image unless sampling `all`), in their seeded order.

    A setting the method resolves from the data (asif's `num_anchors="auto"`) is then written into the model's
    config, so the saved aligner reloads at the width it was trained at, and a similarity head built for another
    embedding width is rebuilt for the new one."""
    rows = sampler.epoch_rows(-1)[: args.init_samples]
    batch = _to_device(source.fetch(rows), device)
    model.aligner.init_from_data(
        batch["vision_features"],
        batch["text_features"],
        seed=args.seed,
        vision_mask=batch.get("vision_mask"),
        text_mask=batch.get("text_mask"),
    )
    model.config.method_config = model.aligner.config.to_dict()
    model.config.projection_dim = model.aligner.embed_dim
    if model.similarity.dim != model.aligner.embed_dim:
        model.similarity = type(model.similarity)(model.aligner.embed_dim, **model.config.similarity_config).to(device)


def _diagnostics(model) -> dict:
    report = getattr(model.aligner, "diagnostics", None)
    return {f"diag_{k}": float(v) for k, v in report().items()} if callable(report) else {}


def schedule_regularizers(model, forward_calls: int) -> None:
    """Tell every regulariser with a warm-up how many training forward calls the run makes (STRUCTURE's
    `warmup_steps="auto"` warms up over a share of them)."""
    for regularizer in model.regularizers.values():
        schedule = getattr(regularizer, "set_training_length", None)
        if callable(schedule):
            schedule(forward_calls)


def _record(state: dict, entry: dict, accelerator: Accelerator) -> None:
    state["history"].append(entry)
    logger.info(json.dumps(entry))
    accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=entry["step"])


def _improved(state: dict, metrics: dict, plan: TrainingPlan) -> bool:
    if plan.metric_for_best_model not in metrics:
        raise ValueError(f"metric_for_best_model={plan.metric_for_best_model!r} is not among {sorted(metrics)}")
    value, best = metrics[plan.metric_for_best_model], state["best_metric"]
    return best is None or (value > best if plan.greater_is_better else value < best)


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
    "build_optimizer",
    "TrainingPlan",
    "TrainingResult",
    "plan_training",
    "evaluate_on_rows",
    "init_from_training_rows",
    "schedule_regularizers",
    "split_by_image",
    "train",
]
