"""Training checkpoints: the aligner's tensors, the method's training state and the optimiser, written atomically.

A checkpoint folder is written as `checkpoint-<step>.tmp` and renamed when whole (its `trainer_state.json`, written
last, marks it complete), so a run killed while saving resumes from the previous checkpoint. Aligner tensors go to
safetensors; the optimiser/scheduler/RNG state is loaded back with `weights_only=True`. The frozen encoders are never
part of a checkpoint (unlike `accelerator.save_state`, which would copy them every time).
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging

logger = logging.get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
METHOD_STATE_FILE = "method_training_state.safetensors"  # e.g. the codebook's EMA teacher


def resume_dir(args) -> str | None:
    """The checkpoint folder `args.resume_from_checkpoint` (an `AlignmentArguments` field) points to, if any."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        path = latest_checkpoint(args.output_dir)
        if path is None:
            logger.info(f"resume_from_checkpoint='latest' but {args.output_dir!r} holds no checkpoint: starting fresh")
        return path
    if not os.path.isfile(os.path.join(args.resume_from_checkpoint, STATE_FILE)):
        raise ValueError(f"resume_from_checkpoint={args.resume_from_checkpoint!r} is not a complete checkpoint folder")
    return args.resume_from_checkpoint


def latest_checkpoint(output_dir: str | None) -> str | None:
    """Newest *complete* checkpoint: written under a temporary name and renamed only when whole."""
    if not output_dir or not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if (
            name.startswith(CHECKPOINT_PREFIX)
            and name[len(CHECKPOINT_PREFIX) :].isdigit()
            and os.path.isfile(os.path.join(path, STATE_FILE))
        ):
            steps.append((int(name[len(CHECKPOINT_PREFIX) :]), path))
    return max(steps)[1] if steps else None


def remove_partial_checkpoints(output_dir: str | None) -> None:
    """Delete the `checkpoint-<step>.tmp` folders of a run killed while saving (never read: only renamed ones are)."""
    if not output_dir or not os.path.isdir(output_dir):
        return
    for name in sorted(os.listdir(output_dir)):
        if name.startswith(CHECKPOINT_PREFIX) and name.endswith(".tmp"):
            logger.warning(f"removing {os.path.join(output_dir, name)}: an unfinished checkpoint of an interrupted run")
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def save_checkpoint(args, accelerator, model, optimizer, scheduler, state, best_state) -> None:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    final = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}{state['global_step']}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    unwrapped = accelerator.unwrap_model(model)
    save_file(
        {k: v.contiguous() for k, v in unwrapped.aligner_state_dict().items()}, os.path.join(tmp, "aligner.safetensors")
    )
    method_state = unwrapped.aligner.training_state()
    if method_state:
        save_file({k: v.contiguous() for k, v in method_state.items()}, os.path.join(tmp, METHOD_STATE_FILE))
    if best_state is not None:
        save_file({k: v.contiguous() for k, v in best_state.items()}, os.path.join(tmp, "best_aligner.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,  # fp16 loss scale
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        },
        os.path.join(tmp, "optimizer.pt"),
    )
    with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as handle:
        json.dump(state, handle)  # written last: its presence marks the folder complete
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    checkpoints = sorted(
        (int(n[len(CHECKPOINT_PREFIX) :]), n)
        for n in os.listdir(args.output_dir)
        if n.startswith(CHECKPOINT_PREFIX) and n[len(CHECKPOINT_PREFIX) :].isdigit()
    )
    for _, name in checkpoints[: max(0, len(checkpoints) - args.save_total_limit)]:
        shutil.rmtree(os.path.join(args.output_dir, name), ignore_errors=True)


def load_checkpoint(path, model, optimizer, scheduler, scaler=None) -> tuple[dict, dict | None]:
    model.load_state_dict(
        load_file(os.path.join(path, "aligner.safetensors"), device=str(model.logit_scale.device)), strict=False
    )
    method_state_path = os.path.join(path, METHOD_STATE_FILE)
    if os.path.isfile(method_state_path):
        model.aligner.load_training_state(load_file(method_state_path, device=str(model.logit_scale.device)))
    extra = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    if scaler is not None and extra.get("scaler"):
        scaler.load_state_dict(extra["scaler"])
    torch.set_rng_state(extra["rng"]["torch"])
    if extra["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(extra["rng"]["cuda"])
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as handle:
        state = json.load(handle)
    best_path = os.path.join(path, "best_aligner.safetensors")
    best = load_file(best_path) if os.path.isfile(best_path) else None
    return state, best
