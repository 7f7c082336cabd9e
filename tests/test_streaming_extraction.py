"""Streaming extraction: `extract_features` over `load_dataset(..., streaming=True)` of webdataset tar shards and
parquet files made here, into a sharded cache: the features of a map-style extraction, per-shard files checked on
load, bad samples named by (shard, row), resumable after SIGKILL without redoing finished shards, and 2 processes
(gloo) giving the cache of one.

Run as a script (`python test_streaming_extraction.py <workdir> <mode>`) it is the subprocess of the slow tests.
"""

import glob
import hashlib
import io
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from hf_align import AlignerModel
from hf_align.features import (
    META_FILE,
    PARTIAL_SUFFIX,
    SHARD_IMAGE_ID_STRIDE,
    BadSampleError,
    FeatureCacheError,
    extract_features,
    load_cache,
    skipped_samples,
)
from hf_align.features.store import _remove_stale_partial_caches
from hf_align.features.streaming import stream_identity

SHARD_SIZES = (4, 3, 5)  # uneven: a map-style batch of 2 straddles shards 0/1 ... where a streamed one cannot


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _caption(shard: int, row: int) -> str:
    return f"picture {row} of shard {shard}" + " seen from far away" * (row % 3)  # lengths differ: padding differs


def write_webdataset(folder, corrupt=None) -> list[str]:
    """3 tar shards of `<key>.jpg`, `<key>.txt`, `<key>.cls`; `corrupt=(shard, row)` gets bytes that are no image."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for shard, size in enumerate(SHARD_SIZES):
        path = os.path.join(folder, f"train-{shard}.tar")
        with tarfile.open(path, "w") as tar:
            for row in range(size):
                image = b"not an image" if corrupt == (shard, row) else _jpeg(100 * shard + row)
                members = {"jpg": image, "txt": _caption(shard, row).encode(), "cls": str((shard + row) % 3).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"s{shard}-{row:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def write_parquet(folder) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for shard, size in enumerate(SHARD_SIZES):
        table = pa.table(
            {
                "image": [{"bytes": _jpeg(100 * shard + row), "path": None} for row in range(size)],
                "caption": [_caption(shard, row) for row in range(size)],
                "label": [(shard + row) % 3 for row in range(size)],
            }
        )
        paths.append(os.path.join(folder, f"part-{shard}.parquet"))
        pq.write_table(table, paths[-1])
    return paths


def webdataset_stream(paths):
    return datasets.load_dataset("webdataset", data_files=paths, split="train", streaming=True)


def expected_image_ids() -> list[int]:
    return [shard * 2**32 + row for shard, size in enumerate(SHARD_SIZES) for row in range(size)]


@pytest.fixture(scope="module")
def model(tiny_vit, tiny_bert):
    return AlignerModel.from_encoders(tiny_vit, tiny_bert, projection_dim=8)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {"webdataset": write_webdataset(root / "wds"), "parquet": write_parquet(root / "parquet")}


def _count_calls(module):
    calls = []
    return calls, module.register_forward_hook(lambda *args: calls.append(1))


def _file_sha256(path) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


# ------------------------------------------------------------------------------------------ streamed = map-style
@pytest.mark.parametrize(
    "builder, columns, num_workers",
    [("webdataset", ("jpg", "txt", "cls"), 0), ("parquet", ("image", "caption", "label"), 2)],
)
def test_streamed_extraction_equals_map_style_and_writes_the_sharded_layout(
    model, sources, tmp_path, builder, columns, num_workers
):
    image, text, kept = columns
    files = sources[builder]
    stream = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
    assert stream.num_shards == 3
    kwargs = dict(image_column=image, text_column=text, keep_columns=[kept], batch_size=2, cache_dir=tmp_path)
    vision_calls, hook = _count_calls(model.vision_model)
    try:
        streamed = extract_features(model, model.processor, stream, num_workers=num_workers, **kwargs)
        # one forward pass per batch of 2 within each shard: 2 + 2 + 3 (a map-style run needs 6)
        assert len(vision_calls) == sum(math.ceil(size / 2) for size in SHARD_SIZES) == 7
        again = extract_features(model, model.processor, stream, **kwargs)
        assert len(vision_calls) == 7  # the finished cache is reused: no encoder runs
    finally:
        hook.remove()
    mapped = extract_features(
        model, model.processor, datasets.load_dataset(builder, data_files=files, split="train"), **kwargs
    )
    assert (
        streamed.column_names
        == mapped.column_names
        == [
            "vision_layer_2",
            "vision_last_hidden_state",
            "text_layer_2",
            "text_last_hidden_state",
            "image_id",
            kept,
        ]
    )
    assert streamed["image_id"] == expected_image_ids() and mapped["image_id"] == list(range(12))
    assert streamed[kept] == mapped[kept] == [(s + r) % 3 for s, n in enumerate(SHARD_SIZES) for r in range(n)]
    for name in streamed.column_names[:4]:
        # The rows are the same images and captions in the same order; the batches are not (map-style batches of 2
        # straddle shard boundaries, streamed ones stop at them), so captions are padded with other neighbours:
        # padded positions are masked out, equal up to float rounding of differently shaped matmuls.
        torch.testing.assert_close(
            torch.tensor(streamed[name]), torch.tensor(mapped[name]), rtol=1e-5, atol=1e-6, msg=name
        )
    assert again.to_dict() == streamed.to_dict()

    folder = os.path.dirname(os.path.dirname(streamed.cache_files[0]["filename"]))
    assert sorted(os.listdir(folder)) == ["data", META_FILE]  # no progress records, no lock left behind
    shard_files = [os.path.join(folder, "data", f"shard-{i:05d}.arrow") for i in range(3)]
    assert [f["filename"] for f in streamed.cache_files] == shard_files
    assert sorted(os.listdir(tmp_path)) == sorted({os.path.basename(folder), os.path.basename(_folder_of(mapped))})
    meta = json.loads(open(os.path.join(folder, META_FILE), encoding="utf-8").read())
    assert meta["layout"] == "sharded" and meta["complete"] and meta["num_rows"] == 12 and meta["skipped"] == []
    assert meta["fingerprint"] == os.path.basename(folder)  # under cache_dir the folder is named by it
    assert [(s["file"], s["source_shard"], s["num_rows"], s["num_source_rows"]) for s in meta["shards"]] == [
        (f"data/shard-{i:05d}.arrow", i, n, n) for i, n in enumerate(SHARD_SIZES)
    ]
    for record, path in zip(meta["shards"], shard_files):
        assert (record["size"], record["sha256"]) == (os.path.getsize(path), _file_sha256(path))
    identity = meta["parts"]["dataset"]
    assert identity["builder"] == builder and identity["num_shards"] == 3 and len(identity["stream"]) == 24
    assert meta["parts"]["processor"]["image_backend"] == [
        type(model.processor.image_processor).__name__,
        model.processor.image_processor.backend,
    ]


def _folder_of(features) -> str:
    return os.path.dirname(features.cache_files[0]["filename"])


def test_stream_identity_follows_the_files_and_the_transforms(sources, tmp_path):
    paths = write_webdataset(tmp_path / "copy")
    first, second = stream_identity(webdataset_stream(paths)), stream_identity(webdataset_stream(paths))
    assert first == second  # derived, not random: a rerun finds its cache
    mapped = webdataset_stream(paths).map(lambda row: {"txt": row["txt"].upper()})
    assert stream_identity(mapped)["stream"] not in (None, first["stream"])
    assert stream_identity(webdataset_stream(paths[:2]))["num_shards"] == 2
    write_webdataset(tmp_path / "copy", corrupt=(0, 0))  # the same file names, other content
    assert stream_identity(webdataset_stream(paths))["stream"] != first["stream"]
    as_stream = datasets.Dataset.from_dict({"a": [1, 2, 3]}).to_iterable_dataset(num_shards=3)
    assert stream_identity(as_stream)["stream"] is not None  # traced to the map-style shards' fingerprints


def test_stream_without_identity_needs_cache_path(model, tmp_path):
    def rows():
        for i in range(3):
            yield {"image": _jpeg(i), "caption": f"generated {i}"}

    stream = datasets.IterableDataset.from_generator(rows)
    assert stream_identity(stream)["stream"] is None
    with pytest.raises(
        ValueError,
        match=r"cache_path is required for this IterableDataset: its rows do not come from data files or map-style "
        r"datasets \(e.g. IterableDataset.from_generator\), so no cache fingerprint can be derived from it",
    ):
        extract_features(model, model.processor, stream, cache_dir=tmp_path)
    assert os.listdir(tmp_path) == []
    features = extract_features(model, model.processor, stream, cache_path=tmp_path / "named")
    assert features["image_id"] == [0, 1, 2] and len(load_cache(str(tmp_path / "named"))) == 3


def test_a_stream_split_by_node_or_missing_columns_is_refused(model, sources, tmp_path):
    from datasets.distributed import split_dataset_by_node

    stream = webdataset_stream(sources["webdataset"])
    with pytest.raises(ValueError, match=r"dataset is already split by node .* give the whole stream"):
        extract_features(model, model.processor, split_dataset_by_node(stream, 0, 3), image_column="jpg")
    with pytest.raises(ValueError, match=r"text_column='caption' is not a column of the dataset; columns: \['jpg',"):
        extract_features(model, model.processor, stream, image_column="jpg", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"keep_columns names 'label', not a column of the dataset"):
        extract_features(model, model.processor, stream, "jpg", "txt", keep_columns=["label"], cache_dir=tmp_path)


def test_cli_extract_streaming(tiny_vit, tiny_bert, sources, tmp_path, capsys):
    from hf_align.commands.cli import main

    folder = os.path.dirname(sources["parquet"][0])
    common = ["extract", "--vision_model", tiny_vit, "--text_model", tiny_bert, "--dataset", folder, "--streaming"]
    assert main([*common, "--cache_dir", str(tmp_path)]) == 0
    (cache,) = os.listdir(tmp_path)
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "12 rows, columns ['vision_layer_2', 'vision_last_hidden_state', 'text_layer_2', 'text_last_hidden_state', "
        "'image_id']",
        f"cache: {tmp_path / cache / 'data' / 'shard-00000.arrow'}",
    ]
    assert load_cache(str(tmp_path / cache))["image_id"] == expected_image_ids()
    with pytest.raises(ValueError, match=r"max_samples=5 does not apply with --streaming: a stream is extracted whole"):
        main([*common, "--cache_dir", str(tmp_path), "--max_samples", "5"])


# ------------------------------------------------------------------------------------------ integrity, bad samples
def test_damaged_shard_is_refused_naming_it(model, sources, tmp_path):
    stream = webdataset_stream(sources["webdataset"])
    features = extract_features(model, model.processor, stream, "jpg", "txt", cache_path=tmp_path / "cache")
    folder = str(tmp_path / "cache")
    assert skipped_samples(features) == []
    path = features.cache_files[1]["filename"]
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:  # same size, one byte flipped
        handle.seek(size - 300)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(
        FeatureCacheError,
        match=r"is damaged: data/shard-00001.arrow has SHA-256 [0-9a-f]{64}, [0-9a-f]{64} was written",
    ):
        load_cache(folder)
    assert len(load_cache(folder, verify_checksum=False)) == 12  # sizes only: the caller opted out
    with open(path, "r+b") as handle:
        handle.truncate(size - 100)
    with pytest.raises(
        FeatureCacheError,
        match=rf"is damaged: data/shard-00001.arrow is {size - 100} bytes, {size} bytes were written \(truncated",
    ):
        load_cache(folder, verify_checksum=False)
    with pytest.raises(FeatureCacheError, match=r"data/shard-00001.arrow is \d+ bytes"):
        extract_features(model, model.processor, stream, "jpg", "txt", cache_path=folder)  # never rebuilt for you


def test_bad_sample_in_a_stream_is_named_by_shard_and_row_then_skipped(model, tmp_path):
    stream = webdataset_stream(write_webdataset(tmp_path / "wds", corrupt=(2, 1)))
    with pytest.raises(BadSampleError, match=r"^shard 2, row 1: 'jpg': cannot be decoded as an image"):
        extract_features(model, model.processor, stream, "jpg", "txt", batch_size=2, cache_path=tmp_path / "raise")
    # shards 0 and 1 were finished before the bad sample: kept for a rerun, which needs the same inputs
    assert sorted(os.listdir(tmp_path / f"raise{PARTIAL_SUFFIX}" / "data")) == [
        "shard-00000.arrow",
        "shard-00001.arrow",
    ]
    features = extract_features(
        model, model.processor, stream, "jpg", "txt", batch_size=2, cache_dir=tmp_path / "c", on_bad_sample="skip"
    )
    ((sample),) = skipped_samples(features)
    assert (sample["shard"], sample["row"], sample["caption"]) == (2, 1, None)
    assert sample["reason"].startswith("'jpg': cannot be decoded as an image")
    bad_id = 2 * SHARD_IMAGE_ID_STRIDE + 1
    assert features["image_id"] == [i for i in expected_image_ids() if i != bad_id]
    meta = json.loads(open(os.path.join(_folder_of(features), "..", META_FILE), encoding="utf-8").read())
    assert [s["num_rows"] for s in meta["shards"]] == [4, 3, 4] and meta["shards"][2]["num_source_rows"] == 5
    assert meta["shards"][2]["skipped"] == [sample]


# ------------------------------------------------------------------------------------------ resume
def _interrupt_in_shard_1(model, stream, kwargs) -> None:
    """Run the extraction and stop it (KeyboardInterrupt) once source shard 0 is recorded done."""
    calls = []

    def die_in_shard_1(module, args, output):
        calls.append(1)
        # shard 0 takes 2 batches; its last is written once the next one is launched (call 3): dies in shard 1
        if len(calls) == 4:
            raise KeyboardInterrupt

    hook = model.vision_model.register_forward_hook(die_in_shard_1)
    try:
        with pytest.raises(KeyboardInterrupt):
            extract_features(model, model.processor, stream, **kwargs)
    finally:
        hook.remove()


def _extract_counting_calls(model, stream, kwargs):
    vision_calls, hook = _count_calls(model.vision_model)
    try:
        return extract_features(model, model.processor, stream, **kwargs), len(vision_calls)
    finally:
        hook.remove()


def test_an_interrupted_extraction_resumes_without_redoing_finished_shards(model, sources, tmp_path):
    stream = webdataset_stream(sources["webdataset"])
    target = str(tmp_path / "cache")
    kwargs = dict(image_column="jpg", text_column="txt", batch_size=2, cache_path=target)
    _interrupt_in_shard_1(model, stream, kwargs)
    partial = target + PARTIAL_SUFFIX
    assert not os.path.exists(target)
    assert sorted(os.listdir(os.path.join(partial, "data"))) == ["shard-00000.arrow"]  # no half-written tmp
    finished = os.stat(os.path.join(partial, "data", "shard-00000.arrow"))
    # a map-style extraction's cleanup of stopped runs' leftovers never takes a streamed run's partial folder
    _remove_stale_partial_caches(target)
    assert os.path.isdir(partial)

    resumed, calls = _extract_counting_calls(model, stream, kwargs)
    assert calls == 2 + 3  # shards 1 and 2 only
    kept = os.stat(os.path.join(target, "data", "shard-00000.arrow"))
    assert (kept.st_ino, kept.st_mtime_ns) == (finished.st_ino, finished.st_mtime_ns)
    assert not os.path.exists(partial)
    reference = extract_features(model, model.processor, stream, "jpg", "txt", batch_size=2, cache_dir=tmp_path / "r")
    assert resumed.to_dict() == reference.to_dict()

    # stopped after the metadata was written but before the rename: the next run only renames
    os.rename(target, partial)
    again, calls = _extract_counting_calls(model, stream, kwargs)
    assert calls == 0 and sorted(os.listdir(target)) == ["data", META_FILE] and not os.path.exists(partial)
    assert again.to_dict() == reference.to_dict()


def test_a_finished_shard_damaged_while_stopped_is_redone(model, sources, tmp_path, caplog):
    stream = webdataset_stream(sources["webdataset"])
    target = str(tmp_path / "cache")
    kwargs = dict(image_column="jpg", text_column="txt", batch_size=2, cache_path=target)
    _interrupt_in_shard_1(model, stream, kwargs)
    with open(os.path.join(target + PARTIAL_SUFFIX, "data", "shard-00000.arrow"), "r+b") as handle:
        handle.seek(-200, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with caplog.at_level(logging.WARNING, logger="hf_align.features"):
        resumed, calls = _extract_counting_calls(model, stream, kwargs)
    assert "redoing source shard 0: data/shard-00000.arrow has SHA-256 " in caplog.text
    assert calls == 7  # every shard
    assert len(resumed) == 12 and not os.path.exists(target + PARTIAL_SUFFIX)
    # a partial folder at a named cache_path is resumed with its own inputs only, never deleted for other ones
    _interrupt_in_shard_1(model, stream, kwargs := {**kwargs, "cache_path": str(tmp_path / "other")})
    with pytest.raises(
        FeatureCacheError,
        match=r"other.partial' holds an unfinished extraction of other inputs \(layers.text: recorded \[2\], now "
        r"\[0\]; taps.text.text_layer_0: .*\); rerun with the inputs it was started with, or delete it to start over",
    ):
        extract_features(model, model.processor, stream, text_layers=[0], **kwargs)
    assert os.path.isfile(tmp_path / f"other{PARTIAL_SUFFIX}" / "data" / "shard-00000.arrow")


# ------------------------------------------------------------------------------------------ slow: SIGKILL, 2 processes
def _script(workdir: str, mode: str) -> None:
    """The subprocess of the slow tests: extract the webdataset stream of `workdir` with the encoders it names."""
    from hf_align.utils.distributed import process_state

    config = json.loads(open(os.path.join(workdir, "config.json"), encoding="utf-8").read())
    model = AlignerModel.from_encoders(config["vision"], config["text"], projection_dim=8)
    stream = webdataset_stream(config["files"])
    kwargs = dict(image_column="jpg", text_column="txt", keep_columns=["cls"], batch_size=2, num_workers=0)
    if mode == "slow":  # a batch takes 0.3 s, and each is logged: the parent kills the run mid-shard
        log = open(os.path.join(workdir, "encoder_calls.log"), "a", encoding="utf-8")

        def slow(module, args, output):
            log.write("call\n")
            log.flush()
            time.sleep(0.3)

        model.vision_model.register_forward_hook(slow)
        extract_features(model, model.processor, stream, cache_path=os.path.join(workdir, "killed"), **kwargs)
        return
    state = process_state()
    calls, _ = _count_calls(model.vision_model)
    features = extract_features(
        model, model.processor, stream, cache_dir=os.path.join(workdir, f"cache-{state.num_processes}"), **kwargs
    )
    report = {"cache": os.path.dirname(_folder_of(features)), "rows": len(features), "encoder_calls": len(calls)}
    with open(os.path.join(workdir, f"report-{state.num_processes}-{state.process_index}.json"), "w") as handle:
        json.dump(report, handle)


@pytest.fixture
def workdir(tmp_path, sources, tiny_vit, tiny_bert):
    config = {"vision": tiny_vit, "text": tiny_bert, "files": sources["webdataset"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
def test_sigkilled_streaming_extraction_resumes_and_equals_an_uninterrupted_run(model, workdir):
    process = subprocess.Popen(
        [sys.executable, __file__, str(workdir), "slow"], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    partial = workdir / f"killed{PARTIAL_SUFFIX}"
    record = partial / "progress" / "shard-00000.json"
    deadline = time.monotonic() + 240
    while not record.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # kill -9: no handler, no cleanup
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr.decode(errors="replace")[-3000:]
    done = sorted(name for name in os.listdir(partial / "progress") if name.startswith("shard-"))
    assert done[0] == "shard-00000.json" and len(done) < 3 and not (workdir / "killed").exists()
    finished = {name: os.stat(partial / "data" / name.replace(".json", ".arrow")) for name in done}
    calls_before = len((workdir / "encoder_calls.log").read_text().splitlines())
    assert calls_before >= 2  # shard 0's two batches at least

    vision_calls, hook = _count_calls(model.vision_model)
    kwargs = dict(image_column="jpg", text_column="txt", keep_columns=["cls"], batch_size=2, num_workers=0)
    stream = webdataset_stream(json.loads((workdir / "config.json").read_text())["files"])
    try:
        resumed = extract_features(model, model.processor, stream, cache_path=workdir / "killed", **kwargs)
    finally:
        hook.remove()
    redone = [i for i in range(3) if f"shard-{i:05d}.json" not in done]
    assert len(vision_calls) == sum(math.ceil(SHARD_SIZES[i] / 2) for i in redone)  # finished shards not redone
    for name, stat in finished.items():
        kept = os.stat(workdir / "killed" / "data" / name.replace(".json", ".arrow"))
        assert (kept.st_ino, kept.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), name
    reference = extract_features(model, model.processor, stream, cache_path=workdir / "reference", **kwargs)
    assert resumed.to_dict() == reference.to_dict()
    metas = [json.loads((workdir / name / META_FILE).read_text()) for name in ("killed", "reference")]
    assert metas[0]["shards"] == metas[1]["shards"]  # byte-identical shard files: same sizes and SHA-256


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_extract_the_cache_of_one(workdir):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port()), __file__, str(workdir), "run"]
    single = [sys.executable, __file__, str(workdir), "run"]
    processes = [
        subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd in (launch, single)
    ]
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-6000:]
    reports = {name: json.loads((workdir / f"report-{name}.json").read_text()) for name in ("1-0", "2-0", "2-1")}
    assert reports["2-0"]["cache"] == reports["2-1"]["cache"] and reports["2-0"]["rows"] == reports["2-1"]["rows"] == 12
    # batches of 2: rank 0 encoded source shards 0 and 2 (2 + 3 batches), rank 1 shard 1 (2), one process all 7
    assert [reports[name]["encoder_calls"] for name in ("2-0", "2-1", "1-0")] == [5, 2, 7]
    one, two = load_cache(reports["1-0"]["cache"]), load_cache(reports["2-0"]["cache"])
    assert one["image_id"] == two["image_id"] == expected_image_ids()
    for column in one.column_names:
        assert np.array_equal(one.with_format("numpy")[column], two.with_format("numpy")[column]), column
    metas = [json.loads(open(os.path.join(r["cache"], META_FILE)).read()) for r in (reports["1-0"], reports["2-0"])]
    assert metas[0]["shards"] == metas[1]["shards"]  # rank 0 wrote shards 0 and 2, rank 1 shard 1: the same files
    assert glob.glob(str(workdir / "cache-2" / f"*{PARTIAL_SUFFIX}")) == []


if __name__ == "__main__":
    _script(sys.argv[1], sys.argv[2])
