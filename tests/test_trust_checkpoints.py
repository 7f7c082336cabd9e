"""Nothing written is lost (issue #21 §3): checkpoint rotation keeps what was just written and "latest" is the last
written checkpoint; files and folders are fsynced before the rename; a damaged checkpoint is skipped with a warning
naming its files; resume loads strictly; only real `checkpoint-<ASCII digits>` folders are read, replaced or deleted.
Property-based tests (§6) generate hostile `output_dir` layouts."""

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import types
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from hf_align import AlignerModel
from hf_align.testing import make_paired_task
from hf_align.training import AlignmentArguments, train
from hf_align.training.checkpoints import CheckpointError, latest_checkpoint, resume_dir, save_checkpoint

FEATURES = make_paired_task(n=64, vision_dim=4, text_dim=4, n_vision_layers=1, n_text_layers=1).to_features()


def run(out, max_steps, save_steps, limit=2, resume=None, eval_fraction=0.0, method="linear"):
    torch.manual_seed(0)
    kwargs = {"hidden_dim": 4} if method == "mlp" else {}
    model = AlignerModel.from_feature_dims(4, 4, method=method, projection_dim=2, **kwargs)
    args = AlignmentArguments(
        output_dir=str(out),
        max_steps=max_steps,
        save_steps=save_steps,
        eval_steps=save_steps,
        save_total_limit=limit,
        per_device_train_batch_size=16,
        eval_fraction=eval_fraction,
        learning_rate=1e-2,
        resume_from_checkpoint=resume,
        save_model=False,
    )
    train(model, FEATURES, args)
    return model


def names(out):
    return sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))


def state_of(path):
    with open(os.path.join(path, "trainer_state.json")) as handle:
        return json.load(handle)


def rewrite(folder, name, tensors):
    """Replace a checkpoint file and re-record it in the manifest, as someone with write access to the folder could:
    the manifest then vouches for the file, and what stops it is the strict load."""
    save_file(tensors, os.path.join(folder, name))
    state = state_of(folder)
    with open(os.path.join(folder, name), "rb") as handle:
        content = handle.read()
    state["checkpoint"]["files"][name] = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    with open(os.path.join(folder, "trainer_state.json"), "w") as handle:
        json.dump(state, handle)


def assert_same_aligner(a, b):
    for key, value in a.aligner_state_dict().items():
        torch.testing.assert_close(b.aligner_state_dict()[key], value, rtol=0, atol=0, msg=key)


# ---------------------------------------------------------------------------------------------- write order
def test_a_run_resumed_from_an_early_checkpoint_keeps_its_own_checkpoints(tmp_path):
    out = tmp_path / "run"
    run(out, max_steps=6, save_steps=2, limit=3)
    assert names(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    # Resumed from checkpoint-2, saving every step with room for 2: before, its checkpoint-3 was deleted as it was
    # written (6 and 4 had higher steps) and "latest" then meant the abandoned run's checkpoint-6.
    resumed = run(out, max_steps=4, save_steps=1, resume=str(out / "checkpoint-2"))
    assert names(out) == ["checkpoint-3", "checkpoint-4"]
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-4")
    assert state_of(out / "checkpoint-4")["global_step"] == 4
    saved = load_file(str(out / "checkpoint-4" / "aligner.safetensors"))
    for key, value in resumed.aligner_state_dict().items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0)


def test_a_resumed_run_killed_after_its_first_checkpoint_resumes_from_it(tmp_path, stop_training_after):
    out, reference = tmp_path / "run", tmp_path / "reference"
    run(out, max_steps=6, save_steps=2, limit=3)
    shutil.copytree(out, reference)
    uninterrupted = run(reference, max_steps=5, save_steps=1, resume=str(reference / "checkpoint-2"))
    torch.manual_seed(0)
    model = AlignerModel.from_feature_dims(4, 4, projection_dim=2)
    stop_training_after(model, 2)  # steps 3 and 4 taken, checkpoint-3 written, killed before checkpoint-4
    args = AlignmentArguments(
        output_dir=str(out),
        max_steps=5,
        save_steps=1,
        save_total_limit=2,
        per_device_train_batch_size=16,
        eval_fraction=0.0,
        learning_rate=1e-2,
        resume_from_checkpoint=str(out / "checkpoint-2"),
        save_model=False,
    )
    with pytest.raises(KeyboardInterrupt):
        train(model, FEATURES, args)
    # checkpoint-3 is the newest work; the abandoned run's checkpoint-6 stays until rotation passes it, never "latest"
    assert names(out) == ["checkpoint-3", "checkpoint-6"]
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-3")
    resumed = run(out, max_steps=5, save_steps=1, resume="latest")
    assert names(out) == ["checkpoint-4", "checkpoint-5"]
    assert_same_aligner(uninterrupted, resumed)


def test_files_and_folders_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events, fsync, replace = [], os.fsync, os.replace

    def recording_fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        return fsync(descriptor)

    def recording_replace(source, target):
        events.append(("replace", str(source), str(target)))
        return replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    out = os.path.realpath(tmp_path / "run")
    run(out, max_steps=2, save_steps=2)
    folder, tmp = os.path.join(out, "checkpoint-2"), os.path.join(out, "checkpoint-2.tmp")
    rename = events.index(("replace", tmp, folder))
    synced_before = {path for kind, *paths in events[:rename] if kind == "fsync" for path in paths}
    assert synced_before == {tmp} | {os.path.join(tmp, name) for name in os.listdir(folder)}
    assert set(os.listdir(folder)) == {"aligner.safetensors", "optimizer.pt", "trainer_state.json"}
    assert ("fsync", out) in events[rename:]  # the rename itself is made durable


# ---------------------------------------------------------------------------------------------- damage
def _truncate(path):
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


def _flip_last_byte(path):  # same size: only the SHA-256 tells
    with open(path, "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 0xFF]))


@pytest.mark.parametrize(
    ("name", "damage", "why"),
    [
        ("optimizer.pt", _truncate, r"optimizer.pt: \d+ bytes, \d+ when written"),
        ("trainer_state.json", lambda path: open(path, "w").close(), r"trainer_state.json: unreadable"),
        ("aligner.safetensors", _truncate, r"aligner.safetensors: \d+ bytes, \d+ when written"),
        ("aligner.safetensors", _flip_last_byte, r"aligner.safetensors: its SHA-256 differs"),
        ("optimizer.pt", os.remove, r"optimizer.pt: missing"),
    ],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, caplog, name, damage, why):
    out = tmp_path / "run"
    reference = run(out, max_steps=6, save_steps=2, limit=3)
    shutil.rmtree(out / "checkpoint-6")  # as if killed after step 4
    damage(str(out / "checkpoint-4" / name))
    with caplog.at_level(logging.WARNING, logger="hf_align.training.checkpoints"):
        assert latest_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert str(out / "checkpoint-4") in caplog.text
    assert any(re.search(why, record.getMessage()) for record in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_align.training.checkpoints"):
        resumed = run(out, max_steps=6, save_steps=2, resume="latest")
    assert (
        f"resuming from {out / 'checkpoint-2'}, skipping damaged checkpoint files: {out / 'checkpoint-4'}"
        in caplog.text
    )
    assert names(out) == ["checkpoint-4", "checkpoint-6"]  # the damaged checkpoint-4 was written again, intact
    assert_same_aligner(reference, resumed)


def test_every_checkpoint_damaged_is_refused_not_restarted(tmp_path):
    out = tmp_path / "run"
    run(out, max_steps=4, save_steps=2)
    for step in (2, 4):
        _truncate(str(out / f"checkpoint-{step}" / "aligner.safetensors"))
    args = AlignmentArguments(output_dir=str(out), resume_from_checkpoint="latest")
    with pytest.raises(
        CheckpointError, match=r"every checkpoint in .* is damaged \(.*checkpoint-4/aligner.safetensors"
    ):
        resume_dir(args)
    named = AlignmentArguments(output_dir=str(out), resume_from_checkpoint=str(out / "checkpoint-2"))
    with pytest.raises(CheckpointError, match=r"checkpoint-2' is damaged: .*aligner.safetensors: \d+ bytes"):
        resume_dir(named)


def test_a_checkpoint_written_before_manifests_still_resumes(tmp_path):
    out = tmp_path / "run"
    reference = run(out, max_steps=4, save_steps=2)
    shutil.rmtree(out / "checkpoint-4")  # as if killed after step 2
    state = state_of(out / "checkpoint-2")
    del state["checkpoint"]
    (out / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(state))
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert_same_aligner(reference, run(out, max_steps=4, save_steps=2, resume="latest"))


# ---------------------------------------------------------------------------------------------- strict loading
def test_resume_into_a_model_with_other_tensors_is_refused_naming_the_keys(tmp_path):
    out = tmp_path / "run"
    run(out, max_steps=2, save_steps=2)
    # Before: strict=False matched none of the mlp's tensors and trained an untrained mlp on, silently.
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint-2/aligner.safetensors does not hold this model's aligner: missing keys \['aligner\.text_"
        r".*unexpected keys \['aligner\.text_head\.weight', 'aligner\.vision_head\.weight'\]",
    ):
        run(out, max_steps=4, save_steps=2, resume="latest", method="mlp")


def test_resume_with_best_weights_missing_a_tensor_is_refused(tmp_path):
    out = tmp_path / "run"
    run(out, max_steps=2, save_steps=2, eval_fraction=0.25)
    folder = out / "checkpoint-2"
    best = load_file(str(folder / "best_aligner.safetensors"))
    del best["aligner.text_head.weight"]
    rewrite(str(folder), "best_aligner.safetensors", best)
    # Before: the best weights were restored at the end with strict=False, keeping the last step's text head.
    with pytest.raises(
        CheckpointError,
        match=r"best_aligner.safetensors does not hold this model's aligner: missing keys "
        r"\['aligner.text_head.weight'\], unexpected keys \[\]",
    ):
        run(out, max_steps=4, save_steps=2, resume="latest", eval_fraction=0.25)


def test_resume_with_a_reshaped_tensor_is_refused_naming_it(tmp_path):
    out = tmp_path / "run"
    run(out, max_steps=2, save_steps=2)
    folder = out / "checkpoint-2"
    weights = load_file(str(folder / "aligner.safetensors"))
    weights["aligner.vision_head.weight"] = torch.zeros(3, 4)
    rewrite(str(folder), "aligner.safetensors", weights)
    with pytest.raises(
        CheckpointError, match=r"shape mismatches \['aligner.vision_head.weight \(saved \(3, 4\), model \(2, 4\)\)'\]"
    ):
        run(out, max_steps=4, save_steps=2, resume="latest")


# ---------------------------------------------------------------------------------------------- folder names
def test_only_real_checkpoint_folders_with_ascii_digits_are_read_or_deleted(tmp_path):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run(out, max_steps=2, save_steps=2)
    shutil.copytree(out / "checkpoint-2", elsewhere)  # an intact checkpoint outside output_dir
    hostile = ["checkpoint-٣", "checkpoint-²", "checkpoint-1e3", "checkpoint-+5", "checkpoint-٣.tmp"]
    for name in hostile:
        shutil.copytree(out / "checkpoint-2", out / name)
    os.symlink(elsewhere, out / "checkpoint-5", target_is_directory=True)
    # Before: '٣'.isdigit() made checkpoint-٣ step 3 and the symlink step 5 the latest; '²' crashed int().
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-2")
    run(out, max_steps=3, save_steps=1, limit=1, resume="latest")
    assert names(out) == sorted(["checkpoint-3", "checkpoint-5", *hostile])  # rotation passed them by
    assert os.path.islink(out / "checkpoint-5") and sorted(os.listdir(elsewhere)) == sorted(
        os.listdir(out / "checkpoint-3")
    )


def test_a_checkpoint_path_hf_align_did_not_write_is_not_replaced(tmp_path):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    out.mkdir()
    os.symlink(elsewhere, out / "checkpoint-2", target_is_directory=True)
    with pytest.raises(CheckpointError, match=r"cannot write the checkpoint .*checkpoint-2: that path holds a symlink"):
        run(out, max_steps=2, save_steps=2)
    assert (elsewhere / "keep.txt").read_text() == "mine" and os.path.islink(out / "checkpoint-2")


# ---------------------------------------------------------------------------------------------- properties
def _tiny_training():
    torch.manual_seed(0)
    model = AlignerModel.from_feature_dims(4, 3, projection_dim=2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    accelerator = types.SimpleNamespace(
        wait_for_everyone=lambda: None, is_main_process=True, unwrap_model=lambda m: m, scaler=None
    )
    return model, optimizer, scheduler, accelerator


def _save(out, step, limit):
    model, optimizer, scheduler, accelerator = _tiny_training()
    args = types.SimpleNamespace(output_dir=str(out), save_total_limit=limit)
    save_checkpoint(args, accelerator, model, optimizer, scheduler, {"global_step": step, "history": []}, None)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    folder = tmp_path_factory.mktemp("template")
    _save(folder, 1, 1)
    return folder / "checkpoint-1"


VALID = st.integers(0, 40).map(lambda step: f"checkpoint-{step}")
HOSTILE_NAMES = st.sampled_from(
    ["checkpoint-٣", "checkpoint-²", "checkpoint-1e3", "checkpoint-+5", "checkpoint- 7", "checkpoint-7x", "ckpt-9"]
)
DAMAGE = [None, "truncate", "flip", "empty_state", "missing_optimizer", "bad_manifest", "no_state"]
ENTRY = st.tuples(st.one_of(VALID, HOSTILE_NAMES), st.sampled_from([*DAMAGE, "symlink", "file"]), st.integers(1, 10**6))


def _snapshot(root):
    """Every path under `root` with its bytes (or link target), not following symlinks."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                found[path] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                with open(path, "rb") as handle:
                    found[path] = ("file", handle.read())
    return found


def _build(root, template, entries):
    """An output_dir from hypothesis' (name, kind, serial) entries and an intact checkpoint outside it. Returns
    (output_dir, the checkpoint `latest` must pick or None, whether a checkpoint there is damaged, {name: (serial,
    step)} of the checkpoints hf_align wrote with a readable state: the only ones rotation may delete)."""
    out, outside = root / "out", root / "outside"
    out.mkdir()
    shutil.copytree(template, outside)
    intact, damaged, readable = {}, False, {}
    for name, kind, serial in entries:
        path = out / name
        if os.path.lexists(path):
            continue
        if kind == "symlink":
            os.symlink(outside, path, target_is_directory=True)
            continue
        if kind == "file":
            path.write_bytes(b"not a checkpoint")
            continue
        shutil.copytree(template, path)
        state = state_of(path)
        state["checkpoint"]["serial"] = serial
        (path / "trainer_state.json").write_text(json.dumps(state))
        if kind == "truncate":
            _truncate(str(path / "aligner.safetensors"))
        elif kind == "flip":
            _flip_last_byte(str(path / "optimizer.pt"))
        elif kind == "empty_state":
            (path / "trainer_state.json").write_text("")
        elif kind == "missing_optimizer":
            (path / "optimizer.pt").unlink()
        elif kind == "bad_manifest":  # a file name leading out of the folder, and no optimizer.pt
            state["checkpoint"]["files"] = {"../../outside/optimizer.pt": state["checkpoint"]["files"]["optimizer.pt"]}
            (path / "trainer_state.json").write_text(json.dumps(state))
        elif kind == "no_state":
            (path / "trainer_state.json").unlink()
        step = name[len("checkpoint-") :]
        if not (step.isascii() and step.isdigit()) or kind == "no_state":
            continue  # not a checkpoint folder hf_align wrote
        damaged |= kind is not None
        if kind is None:
            intact[str(path)] = (serial, int(step))
        if kind not in ("empty_state", "bad_manifest"):
            readable[name] = (serial, int(step))
    latest = max(intact, key=intact.get) if intact else None
    return out, latest, damaged, readable


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(ENTRY, max_size=6))
def test_latest_is_the_last_written_intact_checkpoint_or_an_error(template, tmp_path, entries):
    root = Path(tempfile.mkdtemp(dir=tmp_path))  # one folder per example (tmp_path is one per test)
    out, expected, damaged, _ = _build(root, template, entries)
    before = _snapshot(root)
    args = AlignmentArguments(output_dir=str(out), resume_from_checkpoint="latest")
    if expected is None and damaged:
        with pytest.raises(CheckpointError, match="is damaged"):
            resume_dir(args)
    else:
        assert resume_dir(args) == expected
    assert latest_checkpoint(str(out)) == expected
    assert _snapshot(root) == before  # reading never changes anything


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(ENTRY, max_size=6), step=st.integers(0, 40), limit=st.integers(1, 3))
def test_saving_never_deletes_what_it_did_not_write(template, tmp_path, entries, step, limit):
    root = Path(tempfile.mkdtemp(dir=tmp_path))  # one folder per example (tmp_path is one per test)
    out, _, _, readable = _build(root, template, entries)
    before = _snapshot(root)
    name = f"checkpoint-{step}"
    final = out / name
    if os.path.lexists(final) and (os.path.islink(final) or not (final / "trainer_state.json").is_file()):
        with pytest.raises(CheckpointError, match="hf_align did not write and will not replace"):
            _save(out, step, limit)
        assert _snapshot(root) == before
        return
    _save(out, step, limit)
    assert latest_checkpoint(str(out)) == str(final)  # the checkpoint just written is kept and is the latest
    # rotation keeps the limit - 1 checkpoints written last before it (by serial, not by step) ...
    others = {other: key for other, key in readable.items() if other != name}
    kept = {name, *sorted(others, key=others.get, reverse=True)[: limit - 1]}
    assert {other for other in {name, *readable} if os.path.lexists(out / other)} == kept
    # ... and touches nothing else: the outside folder, symlinks, odd names, files, unreadable checkpoints
    after = _snapshot(root)
    for path, content in before.items():
        if not any(
            path == str(out / other) or path.startswith(str(out / other) + os.sep) for other in {name, *readable}
        ):
            assert after.get(path) == content, path
