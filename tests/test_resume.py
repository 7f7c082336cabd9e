"""No lost work: `train()` killed with SIGKILL (mid-epoch, or while writing a checkpoint) resumes from the last
complete checkpoint and ends with exactly the weights of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import datasets
import pytest
import torch
from safetensors.torch import load_file

from hf_align import AlignerModel
from hf_align.features import features_from_tensors
from hf_align.testing import make_paired_task
from hf_align.training import AlignmentArguments, train
from hf_align.training.checkpoints import latest_checkpoint

MAX_STEPS = 24

# The run as a script, slowed down so that the parent's SIGKILL lands mid-epoch.
SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    import datasets
    from hf_align.training import batches, loop
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from run_args import build

    cache, out = sys.argv[1:3]
    fetch = batches.BatchSource.fetch
    def slow_fetch(self, indices, **kwargs):
        time.sleep(0.1)
        return fetch(self, indices, **kwargs)
    batches.BatchSource.fetch = slow_fetch
    model, args = build(out)
    loop.train(model, datasets.load_from_disk(cache), args)
    """
)

RUN_ARGS = textwrap.dedent(
    f"""
    import torch
    from hf_align import AlignerModel
    from hf_align.training import AlignmentArguments

    def build(out):
        torch.manual_seed(0)
        # dropout > 0: a resumed run only matches if the RNG state is restored with the checkpoint
        model = AlignerModel.from_feature_dims(16, 12, method="mlp", projection_dim=8, hidden_dim=16, dropout=0.3)
        args = AlignmentArguments(
            output_dir=out, max_steps={MAX_STEPS}, per_device_train_batch_size=32, per_device_eval_batch_size=64,
            learning_rate=5e-3, eval_fraction=0.2, eval_steps=4, save_steps=4, logging_steps=4, save_total_limit=2,
            seed=7, resume_from_checkpoint="latest",
        )
        return model, args
    """
)


def _checkpoint_names(out):
    return sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))


def _build(out):
    from run_args import build

    return build(out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("resume")
    (tmp_path / "run.py").write_text(SCRIPT)
    (tmp_path / "run_args.py").write_text(RUN_ARGS)
    cache = str(tmp_path / "cache")
    task = make_paired_task(n=400, vision_dim=16, text_dim=12, n_vision_layers=1, n_text_layers=1, seed=3)
    task.to_features().save_to_disk(cache)
    # Every in-process run uses the scripts' single thread, so float reductions happen in the same order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sys.path.insert(0, str(tmp_path))
    try:
        model, args = _build(str(tmp_path / "reference"))  # the uninterrupted reference
        train(model, datasets.load_from_disk(cache), args)
        yield tmp_path, cache
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(tmp_path))


def _assert_same_tensors(path_a, path_b):
    a, b = load_file(path_a), load_file(path_b)
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")


def _assert_same_as_reference(reference, out):
    # the final (best-on-validation) aligner, the last-step weights and the best weights are all bit-identical
    _assert_same_tensors(os.path.join(reference, "model.safetensors"), os.path.join(out, "model.safetensors"))
    for name in ("aligner.safetensors", "best_aligner.safetensors"):
        _assert_same_tensors(
            os.path.join(reference, f"checkpoint-{MAX_STEPS}", name), os.path.join(out, f"checkpoint-{MAX_STEPS}", name)
        )


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(setup):
    tmp_path, cache = setup
    out = str(tmp_path / "killed")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path))
    process = subprocess.Popen(
        [sys.executable, str(tmp_path / "run.py"), cache, out],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while latest_checkpoint(out) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # kill -9: no handler, no cleanup, no flush
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr.decode(errors="replace")[-3000:]
    killed_at = latest_checkpoint(out)
    assert killed_at is not None and int(killed_at.rsplit("-", 1)[1]) < MAX_STEPS  # 10 batches per epoch: mid-epoch
    assert not os.path.exists(os.path.join(out, "model.safetensors"))

    model, args = _build(out)
    result = train(model, datasets.load_from_disk(cache), args)
    assert result.global_step == MAX_STEPS
    _assert_same_as_reference(str(tmp_path / "reference"), out)


def test_kill_while_writing_checkpoint_leaves_tmp_that_is_ignored_and_removed(setup, monkeypatch):
    tmp_path, cache = setup
    out = str(tmp_path / "died_saving")
    real_save = torch.save

    class Killed(BaseException):  # what a SIGKILL leaves on disk: the folder as it was at that instant
        pass

    def dying_save(obj, path, *args, **kwargs):
        if "checkpoint-16.tmp" in str(path):
            raise Killed
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    model, args = _build(out)
    with pytest.raises(Killed):
        train(model, datasets.load_from_disk(cache), args)
    monkeypatch.setattr(torch, "save", real_save)
    assert _checkpoint_names(out) == ["checkpoint-12", "checkpoint-16.tmp", "checkpoint-8"]
    assert os.path.isfile(os.path.join(out, "checkpoint-16.tmp", "aligner.safetensors"))  # half written
    # A later step's leftover that even carries a state file: a .tmp folder is never a resume candidate.
    os.makedirs(os.path.join(out, "checkpoint-20.tmp"))
    with open(os.path.join(out, "checkpoint-20.tmp", "trainer_state.json"), "w") as handle:
        handle.write('{"global_step": 20}')
    assert latest_checkpoint(out) == os.path.join(out, "checkpoint-12")

    model, args = _build(out)
    train(model, datasets.load_from_disk(cache), args)
    assert _checkpoint_names(out) == [f"checkpoint-{MAX_STEPS - 4}", f"checkpoint-{MAX_STEPS}"]  # no .tmp left
    _assert_same_as_reference(str(tmp_path / "reference"), out)


def test_resume_from_incomplete_folder_is_refused(tmp_path):
    partial = tmp_path / "checkpoint-8"
    partial.mkdir()
    (partial / "aligner.safetensors").write_bytes(b"")
    features = make_paired_task(n=40, vision_dim=4, text_dim=4, n_vision_layers=1, n_text_layers=1).to_features()
    args = AlignmentArguments(resume_from_checkpoint=str(partial), output_dir=str(tmp_path), eval_fraction=0.0)
    with pytest.raises(
        ValueError, match=r"resume_from_checkpoint=.*checkpoint-8.* is not a complete checkpoint folder"
    ):
        train(AlignerModel.from_feature_dims(4, 4, projection_dim=2), features, args)


def test_codebook_resume_restores_the_ema_teacher(tmp_path, stop_training_after):
    """The codebook's EMA teacher lives outside state_dict: checkpoints carry it, so resuming changes nothing."""
    features = make_paired_task(160, seed=3).to_features()

    def run(out, die_at=None):
        torch.manual_seed(0)
        model = AlignerModel.from_feature_dims(
            64, 48, method="codebook", projection_dim=16, num_codes=8, usage_window=5
        )
        args = AlignmentArguments(
            output_dir=out,
            max_steps=12,
            per_device_train_batch_size=32,
            eval_fraction=0.2,
            eval_steps=4,
            save_steps=4,
            logging_steps=4,
            learning_rate=5e-3,
            seed=1,
            resume_from_checkpoint="latest",
        )
        if die_at is not None:
            stop_training_after(model, die_at)  # a fresh run: its die_at-th step is step die_at
        train(model, features, args)
        return model

    reference = run(str(tmp_path / "reference"))
    with pytest.raises(KeyboardInterrupt):
        run(str(tmp_path / "resumed"), die_at=6)
    assert latest_checkpoint(str(tmp_path / "resumed")).endswith("checkpoint-4")
    assert os.path.isfile(tmp_path / "resumed" / "checkpoint-4" / "method_training_state.safetensors")
    resumed = run(str(tmp_path / "resumed"))
    for key, value in reference.aligner_state_dict().items():
        torch.testing.assert_close(resumed.aligner_state_dict()[key], value, rtol=0, atol=0, msg=key)
    for key, value in reference.aligner.training_state().items():
        torch.testing.assert_close(resumed.aligner.training_state()[key], value, rtol=0, atol=0, msg=key)


def test_per_epoch_caption_sampling_resumes_exactly(tmp_path, stop_training_after):
    """One caption per image drawn afresh each epoch: a resumed run draws the captions the uninterrupted one did."""
    task = make_paired_task(40, n_vision_layers=1, n_text_layers=1, seed=4)
    g = torch.Generator().manual_seed(0)
    text = task.text[0].repeat_interleave(3, 0) + 0.05 * torch.randn(120, task.text[0].shape[1], generator=g)
    features = features_from_tensors(
        {0: task.vision[0].repeat_interleave(3, 0)}, {0: text}, image_id=torch.arange(40).repeat_interleave(3)
    )

    def run(out, die_at=None):
        torch.manual_seed(0)
        model = AlignerModel.from_feature_dims(64, 48, projection_dim=8, structure_weight=1.0, structure_warmup_steps=5)
        args = AlignmentArguments(
            output_dir=out,
            max_steps=10,
            per_device_train_batch_size=16,  # 36 training images: 3 steps per epoch, so the kill lands in epoch 1
            eval_fraction=0.1,
            eval_steps=4,
            save_steps=4,
            logging_steps=4,
            learning_rate=5e-3,
            seed=2,
            resume_from_checkpoint="latest",
        )
        if die_at is not None:
            stop_training_after(model, die_at)
        train(model, features, args)
        return model

    reference = run(str(tmp_path / "reference"))
    with pytest.raises(KeyboardInterrupt):
        run(str(tmp_path / "resumed"), die_at=6)
    assert latest_checkpoint(str(tmp_path / "resumed")).endswith("checkpoint-4")
    resumed = run(str(tmp_path / "resumed"))
    for key, value in reference.aligner_state_dict().items():
        torch.testing.assert_close(resumed.aligner_state_dict()[key], value, rtol=0, atol=0, msg=key)
