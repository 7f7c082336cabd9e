"""Training checkpoints: the aligner's tensors, the method's training state and the optimiser, written atomically.

A checkpoint folder is written as `checkpoint-<step>.tmp`, every file and the folder fsynced, and renamed when whole:
its `trainer_state.json`, written last, marks it complete and records a manifest (`"checkpoint"`: each file's size
and SHA-256, and the folder's write serial). So a run killed while saving resumes from the previous checkpoint, and
a checkpoint damaged later (a truncated file, an empty state file) is recognised and skipped with a warning naming
its files.

"Latest" is the last *written* checkpoint (highest serial), not the highest step: a run resumed from an early
checkpoint writes checkpoints of lower steps than those of the run it abandoned, and those are its newest work.
Rotation (`save_total_limit`) keeps the most recently written ones, so it never deletes the one just written. Only
real folders named `checkpoint-<ASCII digits>` are read, replaced or deleted; anything else in `output_dir` (other
names, symlinks, a folder without `trainer_state.json`) is left alone.

Aligner tensors go to safetensors and are loaded back strictly (a missing, unexpected or reshaped tensor raises
`CheckpointError`); the optimiser/scheduler/RNG state is loaded with `weights_only=True`. The frozen encoders are
never part of a checkpoint (unlike `accelerator.save_state`, which would copy them every time).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers.utils import logging

from ..utils.file_integrity import file_record, fsync_path
from ..utils.safe_loading import ArtefactError

logger = logging.get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "aligner.safetensors"
BEST_WEIGHTS_FILE = "best_aligner.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
METHOD_STATE_FILE = "method_training_state.safetensors"  # e.g. the codebook's EMA teacher
MANIFEST_KEY = "checkpoint"  # in STATE_FILE: {"serial": write order, "files": {name: {"size", "sha256"}}}
_REQUIRED_FILES = (WEIGHTS_FILE, OPTIMIZER_FILE)
_OPTIONAL_FILES = (METHOD_STATE_FILE, BEST_WEIGHTS_FILE)
# [0-9], not \d or str.isdigit(): those accept '٣' (Arabic-Indic) or '²', names int() reads as another step or not
# at all.
_FOLDER = re.compile(r"checkpoint-([0-9]+)")
_LEFTOVER = re.compile(r"checkpoint-[0-9]+(\.old)?\.tmp")
_SHA256 = re.compile(r"[0-9a-f]{64}")

__all__ = ["CheckpointError", "latest_checkpoint", "load_aligner_state", "load_checkpoint", "resume_dir"]


class CheckpointError(ArtefactError):
    """A checkpoint that cannot be resumed from (damaged files, tensors that do not fit the model), or a path in
    `output_dir` that a checkpoint would overwrite although hf_align did not write it."""


def resume_dir(args) -> str | None:
    """The checkpoint folder `args.resume_from_checkpoint` (an `AlignmentArguments` field) points to, if any.

    `"latest"`: the last written intact checkpoint of `args.output_dir` (None when it holds none; `CheckpointError`
    when it holds checkpoints and every one is damaged). A folder: that one, refused when incomplete or damaged.
    """
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        path, damaged = _latest(args.output_dir)
        if path is None and damaged:
            raise CheckpointError(
                f"resume_from_checkpoint='latest': every checkpoint in {args.output_dir!r} is damaged "
                f"({'; '.join(damaged)}); move them away to start afresh"
            )
        if path is None:
            logger.info(f"resume_from_checkpoint='latest' but {args.output_dir!r} holds no checkpoint: starting fresh")
        elif damaged:
            logger.warning(f"resuming from {path}, skipping damaged checkpoint files: {'; '.join(damaged)}")
        return path
    path = args.resume_from_checkpoint
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise CheckpointError(f"resume_from_checkpoint={path!r} is not a complete checkpoint folder")
    damaged = checkpoint_damage(path)
    if damaged:
        raise CheckpointError(f"resume_from_checkpoint={path!r} is damaged: {'; '.join(damaged)}")
    return path


def latest_checkpoint(output_dir: str | None) -> str | None:
    """The last written intact checkpoint of `output_dir` (None if none); damaged newer ones are named in a warning."""
    path, damaged = _latest(output_dir)
    if damaged:
        logger.warning(f"skipping damaged checkpoint files in {output_dir}: {'; '.join(damaged)}")
    return path


def checkpoint_damage(path: str) -> list[str]:
    """What is wrong with the checkpoint folder `path`, one `"<file>: <why>"` per damaged file; empty when intact.

    A file is intact when it is a regular file of the size and SHA-256 its manifest recorded when it was written.
    A checkpoint written before checkpoints carried a manifest can only be checked for its files' presence."""
    try:
        _, manifest = _read_state(path)
    except CheckpointError as err:
        return [str(err)]
    records = manifest["files"] if manifest is not None else dict.fromkeys(_REQUIRED_FILES)
    damaged = [f"{os.path.join(path, name)}: not in the manifest" for name in _REQUIRED_FILES if name not in records]
    for name, record in records.items():
        file = os.path.join(path, name)
        try:
            info = os.lstat(file)
        except FileNotFoundError:
            damaged.append(f"{file}: missing")
            continue
        if not stat.S_ISREG(info.st_mode):
            damaged.append(f"{file}: not a regular file")
        elif record is not None and info.st_size != record["size"]:
            damaged.append(f"{file}: {info.st_size} bytes, {record['size']} when written")
        elif record is not None and file_record(file)["sha256"] != record["sha256"]:
            damaged.append(f"{file}: its SHA-256 differs from the one recorded when it was written")
    return damaged


def remove_partial_checkpoints(output_dir: str | None) -> None:
    """Delete the `checkpoint-<step>.tmp` folders of a run killed while saving (never read: only renamed ones are),
    and the `checkpoint-<step>.old.tmp` of one killed while replacing a checkpoint of the same step."""
    if not output_dir or not os.path.isdir(output_dir):
        return
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if _LEFTOVER.fullmatch(name) and os.path.isdir(path) and not os.path.islink(path):
            logger.warning(f"removing {path}: an unfinished checkpoint of an interrupted run")
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(args, accelerator, model, optimizer, scheduler, state, best_state) -> None:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    output_dir = args.output_dir
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{state['global_step']}")
    if os.path.lexists(final) and (os.path.islink(final) or not os.path.isfile(os.path.join(final, STATE_FILE))):
        raise CheckpointError(
            f"cannot write the checkpoint {final}: that path holds a "
            f"{'symlink' if os.path.islink(final) else 'file or folder without ' + STATE_FILE} which hf_align did not "
            "write and will not replace; move it away and resume"
        )
    written, _ = _checkpoints(output_dir)
    serial = 1 + max((key[0] for key, _ in written), default=0)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    unwrapped = accelerator.unwrap_model(model)
    tensors = {WEIGHTS_FILE: unwrapped.aligner_state_dict(), METHOD_STATE_FILE: unwrapped.aligner.training_state()}
    if best_state is not None:
        tensors[BEST_WEIGHTS_FILE] = best_state
    files = {}
    for name, values in tensors.items():
        if values:
            save_file({k: v.contiguous() for k, v in values.items()}, os.path.join(tmp, name))
            files[name] = _synced_record(os.path.join(tmp, name))
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
        os.path.join(tmp, OPTIMIZER_FILE),
    )
    files[OPTIMIZER_FILE] = _synced_record(os.path.join(tmp, OPTIMIZER_FILE))
    with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as handle:
        json.dump({**state, MANIFEST_KEY: {"serial": serial, "files": files}}, handle)  # last: marks it complete
        handle.flush()
        os.fsync(handle.fileno())
    fsync_path(tmp)  # the folder's entries are on disk before the rename publishes it
    old = None
    if os.path.lexists(final):  # this step's checkpoint of an earlier run: moved aside, deleted once replaced
        old = final + ".old.tmp"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(output_dir)
    if old is not None:
        shutil.rmtree(old)
    # `final` has the highest serial, so it is first: the limit (>= 1) never reaches it.
    written, _ = _checkpoints(output_dir)
    for _, path in written[args.save_total_limit :]:
        shutil.rmtree(path)


def load_checkpoint(path, model, optimizer, scheduler, scaler=None) -> tuple[dict, dict | None]:
    """Restore the aligner, the method's training state, the optimiser, scheduler, scaler and RNG from `path`;
    returns the training state (`trainer_state.json` without its manifest) and the best weights so far (or None).

    Raises `CheckpointError` naming the file when the weights or best weights do not match the model's aligner."""
    state, manifest = _read_state(path)
    listed = set(manifest["files"]) if manifest is not None else set(os.listdir(path))
    device = str(model.logit_scale.device)
    load_aligner_state(model, _load_tensors(path, WEIGHTS_FILE, device), os.path.join(path, WEIGHTS_FILE))
    if METHOD_STATE_FILE in listed:
        model.aligner.load_training_state(_load_tensors(path, METHOD_STATE_FILE, device))
    extra = torch.load(os.path.join(path, OPTIMIZER_FILE), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    if scaler is not None and extra.get("scaler"):
        scaler.load_state_dict(extra["scaler"])
    torch.set_rng_state(extra["rng"]["torch"])
    if extra["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(extra["rng"]["cuda"])
    best = None
    if BEST_WEIGHTS_FILE in listed:
        best = _load_tensors(path, BEST_WEIGHTS_FILE, "cpu")
        _check_aligner_keys(model, best, os.path.join(path, BEST_WEIGHTS_FILE))
    return state, best


def load_aligner_state(model, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load `tensors` into `model`'s aligner strictly: they must be exactly `model.aligner_state_dict()`'s keys and
    shapes, else `CheckpointError` naming `source` and the keys. (`load_state_dict(strict=True)` cannot check this:
    it would ask for the frozen encoders' weights too, which checkpoints and best weights leave out.)"""
    _check_aligner_keys(model, tensors, source)
    model.load_state_dict(tensors, strict=False)


# ---------------------------------------------------------------------------------------------- helpers
def _check_aligner_keys(model, tensors: dict[str, torch.Tensor], source: str) -> None:
    expected = model.aligner_state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    reshaped = [
        f"{key} (saved {tuple(tensors[key].shape)}, model {tuple(value.shape)})"
        for key, value in sorted(expected.items())
        if key in tensors and tensors[key].shape != value.shape
    ]
    if missing or unexpected or reshaped:
        raise CheckpointError(
            f"{source} does not hold this model's aligner: missing keys {missing}, unexpected keys {unexpected}, "
            f"shape mismatches {reshaped}"
        )


def _load_tensors(path: str, name: str, device: str) -> dict[str, torch.Tensor]:
    file = os.path.join(path, name)
    try:
        return load_file(file, device=device)
    except SafetensorError as err:
        raise CheckpointError(f"{file} is not a readable safetensors file ({err})") from None


def _read_state(path: str) -> tuple[dict, dict | None]:
    """(training state, manifest or None for a checkpoint written before manifests) of the checkpoint `path`;
    `CheckpointError` naming `trainer_state.json` when it is not a regular file holding them."""
    file = os.path.join(path, STATE_FILE)
    try:
        if not stat.S_ISREG(os.lstat(file).st_mode):  # a FIFO would block the open, a symlink lead outside
            raise CheckpointError(f"{file}: not a regular file")
        with open(file, encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or type(state.get("global_step")) is not int:
        raise CheckpointError(f"{file}: not a training state (a JSON object with an int global_step)")
    if MANIFEST_KEY not in state:
        return state, None
    manifest = state.pop(MANIFEST_KEY)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        type(manifest.get("serial") if isinstance(manifest, dict) else None) is not int
        or not isinstance(files, dict)
        or any(name not in _REQUIRED_FILES + _OPTIONAL_FILES for name in files)
        or not all(_valid_record(record) for record in files.values())
    ):
        raise CheckpointError(
            f"{file}: malformed {MANIFEST_KEY!r} manifest (expected an int serial and files among "
            f"{list(_REQUIRED_FILES + _OPTIONAL_FILES)}, each with an int size and a sha256)"
        )
    return state, manifest


def _valid_record(record) -> bool:
    return (
        isinstance(record, dict)
        and type(record.get("size")) is int
        and isinstance(record.get("sha256"), str)
        and _SHA256.fullmatch(record["sha256"]) is not None
    )


def _checkpoints(output_dir: str | None) -> tuple[list[tuple[tuple[int, int], str]], list[str]]:
    """The finished checkpoints of `output_dir` as ((serial, step), folder), last written first, and the
    damage of those whose `trainer_state.json` is unreadable (their place in the write order is unknown).

    Only real folders named `checkpoint-<ASCII digits>` holding a `trainer_state.json` count (a symlink could lead
    outside `output_dir`; a folder without a state file was never renamed into place by hf_align)."""
    if not output_dir or not os.path.isdir(output_dir):
        return [], []
    found, damaged = [], []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        match = _FOLDER.fullmatch(name)
        if match is None or os.path.islink(path) or not os.path.isdir(path):
            continue
        if not os.path.lexists(os.path.join(path, STATE_FILE)):
            continue
        try:
            _, manifest = _read_state(path)
        except CheckpointError as err:
            damaged.append(str(err))
            continue
        # Checkpoints written before manifests: serial 0, before every newer one, in step order among themselves.
        found.append(((manifest["serial"] if manifest is not None else 0, int(match.group(1))), path))
    return sorted(found, reverse=True), damaged


def _latest(output_dir: str | None) -> tuple[str | None, list[str]]:
    """(the last written intact checkpoint or None, the damage found in the checkpoints written after it)."""
    found, damaged = _checkpoints(output_dir)
    for _, path in found:
        problems = checkpoint_damage(path)
        if not problems:
            return path, damaged
        damaged.extend(problems)
    return None, damaged


def _synced_record(path: str) -> dict:
    """Size and SHA-256 of the file just written at `path`, after fsyncing its data to disk."""
    fsync_path(path)
    return file_record(path)
