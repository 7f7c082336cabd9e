"""Scale-out: extraction and training on 2 CPU processes (gloo) give what one process gives.

The test launches this file twice at once: under `accelerate launch --multi_gpu --num_processes 2` (on a machine
without CUDA that starts 2 CPU processes, which hf_align joins in a gloo group; accelerate's `--cpu` flag only starts
several processes through mpirun) and as one plain process. Each run extracts a 40-image dataset with a tiny encoder
pair (two captions of different lengths per image, batches split unevenly between the processes), hits its cache
again, meets a bad sample in the second process's share, and trains a linear aligner with the STRUCTURE regulariser
and a learnable temperature on a synthetic cache (global batch 96, per process 48, an uneven last batch).
"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow  # every test reads the runs of `accelerate launch` (2 processes) and of 1 process
GLOBAL_BATCH = 96
N_PAIRS = 301  # 271 training pairs after the 10% validation split: the last global batch of an epoch is 79 (39 + 40)


def _dataset(corrupt_row: int | None = None):
    import datasets

    from hf_align.testing import digits_dataset

    data = digits_dataset(40)
    data = data.map(
        lambda row, i: {"caption": [row["caption"], row["caption"] + " drawn by hand" * (i % 4)]}, with_indices=True
    )
    if corrupt_row is None:
        return data
    raw = data.cast_column("image", datasets.Image(decode=False))
    columns = raw.to_dict()
    columns["image"][corrupt_row] = {"bytes": b"not an image", "path": None}
    return datasets.Dataset.from_dict(columns, features=raw.features)


def _run(workdir: str) -> None:
    """What every process runs; the main process writes what the test compares."""
    from accelerate.utils import set_seed
    from safetensors.torch import save_file

    from hf_align import AlignerModel, AlignmentArguments, train
    from hf_align.features import BadSampleError, FeatureCacheError, extract_features
    from hf_align.testing import make_paired_task
    from hf_align.utils.distributed import process_state

    state = process_state()
    world, rank = state.num_processes, state.process_index
    with open(os.path.join(workdir, "encoders.json"), encoding="utf-8") as handle:
        encoders = json.load(handle)
    model = AlignerModel.from_encoders(encoders["vision"], encoders["text"], projection_dim=8)
    cache_dir = os.path.join(workdir, f"cache-{world}")
    extract = dict(batch_size=8, cache_dir=cache_dir, keep_columns=["label"], num_workers=0)
    features = extract_features(model, model.processor, _dataset(), **extract)
    again = extract_features(model, model.processor, _dataset(), **extract)
    report = {
        "world": world,
        "cache": os.path.dirname(features.cache_files[0]["filename"]),
        "reused": again.cache_files[0]["filename"] == features.cache_files[0]["filename"]
        and len(again) == len(features),
    }
    try:
        extract_features(model, model.processor, _dataset(corrupt_row=37), **extract)
        report["bad_sample"] = None
    except BadSampleError as err:
        report["bad_sample"] = str(err)
    not_a_cache = os.path.join(workdir, f"not-a-cache-{world}")
    os.makedirs(not_a_cache, exist_ok=True)
    try:  # refused by the main process, which decides about the cache folder: every process must hear of it
        extract_features(model, model.processor, _dataset(), cache_path=not_a_cache, num_workers=0)
        report["not_a_cache"] = None
    except FeatureCacheError as err:
        report["not_a_cache"] = str(err)

    cache = make_paired_task(n=N_PAIRS, seed=3).to_features()
    set_seed(0)
    aligner = AlignerModel.from_feature_dims(
        64, 48, projection_dim=16, learnable_temperature=True, structure_weight=1.0, structure_warmup_steps=0
    )
    report["initial"] = {k: v.tolist() for k, v in aligner.aligner_state_dict().items()}
    args = AlignmentArguments(
        max_steps=6,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        learning_rate=1e-2,
        eval_steps=3,
        logging_steps=1,
        save_model=False,
        seed=0,
        mixed_precision="no",
        lr_scheduler_type="linear",
    )
    result = train(aligner, cache, args)
    report["history"] = result.history
    with open(os.path.join(workdir, f"report-{world}-{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle)
    if state.is_main_process:
        save_file(
            {k: v.contiguous() for k, v in aligner.aligner_state_dict().items()},
            os.path.join(workdir, f"weights-{world}.safetensors"),
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_vit, tiny_bert):
    workdir = tmp_path_factory.mktemp("distributed")
    (workdir / "encoders.json").write_text(json.dumps({"vision": tiny_vit, "text": tiny_bert}))
    # Same thread count in both runs: the per-row numbers must not depend on it.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        __file__,
        str(workdir),
    ]
    single = [sys.executable, __file__, str(workdir)]
    processes = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd in (launch, single)
    ]
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-6000:]
    return workdir


def _report(workdir, world: int, rank: int) -> dict:
    return json.loads((workdir / f"report-{world}-{rank}.json").read_text())


def test_two_processes_extract_the_same_cache_rows_in_the_same_order(runs):
    from hf_align.features import META_FILE, load_cache

    one, two = _report(runs, 1, 0), _report(runs, 2, 0)
    assert two["world"] == 2 and _report(runs, 2, 1)["cache"] == two["cache"]  # both processes read one cache
    single, split = load_cache(one["cache"]), load_cache(two["cache"])
    assert len(single) == len(split) == 80 and single.column_names == split.column_names
    for column in single.column_names:
        a, b = single.with_format("numpy")[:][column], split.with_format("numpy")[:][column]
        assert np.array_equal(a, b), column  # exact: same batches, same encoders, same order
    assert split["image_id"][:6] == [0, 0, 1, 1, 2, 2]
    # the shards were concatenated record batch by record batch: the very bytes of the one-process file
    metas = [
        json.loads(open(os.path.join(path, META_FILE), encoding="utf-8").read())
        for path in (one["cache"], two["cache"])
    ]
    assert metas[0]["data_file"] == metas[1]["data_file"]
    assert not [name for name in os.listdir(two["cache"]) if name.startswith("shard-")]
    assert all(_report(runs, 2, rank)["reused"] for rank in (0, 1)) and one["reused"]


def test_errors_met_by_one_process_are_raised_in_every_process(runs):
    messages = [_report(runs, 2, rank)["bad_sample"] for rank in (0, 1)] + [_report(runs, 1, 0)["bad_sample"]]
    assert messages[0] is not None and messages[0] == messages[1]  # the error of the process that met it, everywhere
    without_address = [re.sub(r"0x[0-9a-f]+", "0x", message) for message in messages]
    assert without_address[0] == without_address[2]  # the error one process gives (PIL names its buffer's address)
    assert messages[0].startswith("row 37: 'image': cannot be decoded as an image")
    leftovers = [name for name in os.listdir(runs / "cache-2") if ".tmp-" in name]
    assert leftovers == []  # the partial folder was removed
    refusals = [_report(runs, 2, rank)["not_a_cache"] for rank in (0, 1)]
    assert refusals[0] == refusals[1] and refusals[0].startswith("cache_path=")
    assert refusals[0].endswith(
        "exists but is not a finished hf_align feature cache (no hf_align_cache.json); remove it or give another "
        "cache_path"
    )


def test_two_processes_train_the_weights_of_one_process(runs):
    from safetensors.torch import load_file

    single, split = load_file(str(runs / "weights-1.safetensors")), load_file(str(runs / "weights-2.safetensors"))
    initial = {k: torch.tensor(v) for k, v in _report(runs, 1, 0)["initial"].items()}
    assert sorted(single) == sorted(split) and "logit_scale" in single
    for name in single:
        # up to the rounding of a different reduction order (float32 gradients summed over 2 processes)
        torch.testing.assert_close(split[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
    assert (
        single["aligner.vision_head.weight"] - initial["aligner.vision_head.weight"]
    ).abs().max() > 1e-2  # it trained
    assert single["logit_scale"] != initial["logit_scale"]
    one, two = _report(runs, 1, 0)["history"], _report(runs, 2, 0)["history"]
    assert [sorted(h) for h in one] == [sorted(h) for h in two]
    for a, b in zip(one, two):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    losses = [h["loss"] for h in one if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert any("loss_structure" in h and h["loss_structure"] > 0 for h in one)  # the regulariser ran on the batch
    assert _report(runs, 2, 1)["history"] == two  # both processes logged the same global numbers


if __name__ == "__main__":
    _run(sys.argv[1])
