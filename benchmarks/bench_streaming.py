"""Memory of web-scale data paths: peak resident memory of streaming extraction and of streamed training at two
dataset sizes 10x apart, against the in-memory training path.

    python benchmarks/bench_streaming.py                                   # CPU defaults (a few minutes)
    python benchmarks/bench_streaming.py --extract-sizes 2000,20000 --train-sizes 200000,2000000

Every case runs in a fresh subprocess (so one case's freed memory cannot hide another's) and reports the rise of its
anonymous resident memory (`RssAnon`: heap and tensors; pages of memory-mapped files, which the kernel drops at will,
are left out) over the value after imports and setup, sampled every 5 ms (`_common.PeakMemory`), plus the process's
whole peak RSS (`ru_maxrss`, file-backed pages included).

* `extract (streaming)`: `extract_features` over `load_dataset("parquet", data_files=..., streaming=True)` of
  `--shard-rows`-row Parquet shards of 64x64 JPEG images and captions, tiny ViT + BERT encoders (`hf_align.testing`);
  more rows = more shards of the same size.
* `train (streamed)` / `train (in memory)`: one epoch of a linear aligner on a sharded pooled cache of `--dim`-d
  features (`--shard-rows * 10` rows per shard) with `stream_features=True` / `False`.

Results: results/streaming.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
from _common import PeakMemory, machine, print_table, write_results


# ---------------------------------------------------------------------------------------------- data
def write_parquet_shards(folder: str, n_rows: int, shard_rows: int) -> list[str]:
    """`n_rows` (64x64 JPEG, caption) rows in Parquet files of `shard_rows` rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for shard, start in enumerate(range(0, n_rows, shard_rows)):
        rows = range(start, min(n_rows, start + shard_rows))
        images = []
        for _ in rows:
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
            images.append({"bytes": buffer.getvalue(), "path": None})
        table = pa.table({"image": images, "caption": [f"a photo of object number {i} on a table" for i in rows]})
        path = os.path.join(folder, f"part-{shard:05d}.parquet")
        pq.write_table(table, path)
        paths.append(path)
    return paths


def write_feature_shards(folder: str, n_rows: int, dim: int, shard_rows: int) -> list[str]:
    """A pooled feature cache of `n_rows` rows (two related `dim`-d views) as Arrow files of `shard_rows` rows."""
    from datasets.arrow_writer import ArrowWriter

    from hf_align.features import features_from_tensors

    generator = torch.Generator().manual_seed(0)
    mix = torch.randn(32, dim, generator=generator)
    paths = []
    for shard, start in enumerate(range(0, n_rows, shard_rows)):
        n = min(shard_rows, n_rows - start)
        latent = torch.randn(n, 32, generator=generator)
        vision = latent @ mix + 0.5 * torch.randn(n, dim, generator=generator)
        text = latent @ mix.flip(1) + 0.5 * torch.randn(n, dim, generator=generator)
        chunk = features_from_tensors({0: vision}, {0: text}, image_id=torch.arange(start, start + n))
        path = os.path.join(folder, f"shard-{shard:05d}.arrow")
        writer = ArrowWriter(path=path, features=chunk.features)
        writer.write_table(chunk.data.table)
        writer.finalize()
        writer.close()
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- cases (children)
def run_extract(n_rows: int, shard_rows: int, workdir: str) -> dict:
    from datasets import load_dataset

    from hf_align import AlignerModel, AlignerProcessor, extract_features
    from hf_align.testing import save_tiny_text_encoder, save_tiny_vision_encoder

    vision = save_tiny_vision_encoder(os.path.join(workdir, "vision"), "vit", image_size=32)
    text = save_tiny_text_encoder(os.path.join(workdir, "text"))
    model = AlignerModel.from_encoders(vision, text, method="linear")
    processor = AlignerProcessor.from_encoders(vision, text)
    files = write_parquet_shards(os.path.join(workdir, "source"), n_rows, shard_rows)
    stream = load_dataset("parquet", data_files=files, split="train", streaming=True)
    with PeakMemory(torch.device("cpu")) as memory:
        start = time.perf_counter()
        cache = extract_features(model, processor, stream, cache_path=os.path.join(workdir, "cache"), batch_size=64)
        seconds = time.perf_counter() - start
    return {"rows": len(cache), "shards": len(files), "seconds": seconds, "rise_mib": memory.rise_mib}


def run_train(n_rows: int, dim: int, shard_rows: int, streamed: bool, workdir: str) -> dict:
    import datasets

    from hf_align import AlignerModel, AlignmentArguments, train

    files = write_feature_shards(os.path.join(workdir, "cache"), n_rows, dim, shard_rows)
    features = datasets.concatenate_datasets([datasets.Dataset.from_file(path) for path in files])
    model = AlignerModel.from_feature_dims(dim, dim, method="linear", projection_dim=128)
    args = AlignmentArguments(
        num_train_epochs=1,
        per_device_train_batch_size=4096,
        eval_fraction=0.0,
        logging_steps=10_000,
        save_model=False,
        stream_features=streamed,
    )
    with PeakMemory(torch.device("cpu")) as memory:
        start = time.perf_counter()
        result = train(model, features, args)
        seconds = time.perf_counter() - start
    steps = result.global_step
    return {"rows": n_rows, "shards": len(files), "steps": steps, "seconds": seconds, "rise_mib": memory.rise_mib}


def child(case: dict) -> None:
    # the source shards of an extraction, the cache shards of a training run (an extraction makes its own cache)
    os.makedirs(os.path.join(case["workdir"], "source" if case["kind"] == "extract" else "cache"))
    if case["kind"] == "extract":
        row = run_extract(case["rows"], case["shard_rows"], case["workdir"])
    else:
        streamed = case["kind"] == "train_streamed"
        row = run_train(case["rows"], case["dim"], case["shard_rows"], streamed, case["workdir"])
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(row))


# ---------------------------------------------------------------------------------------------- driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extract-sizes", default="1000,10000", help="image-caption rows of the two extractions")
    parser.add_argument("--train-sizes", default="100000,1000000", help="rows of the two training caches")
    parser.add_argument("--shard-rows", type=int, default=500, help="rows per Parquet shard (x10 per cache shard)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # a child's case, as JSON
    args = parser.parse_args()
    if args.case:
        child(json.loads(args.case))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cases = [{"kind": "extract", "rows": int(n), "shard_rows": args.shard_rows} for n in args.extract_sizes.split(",")]
    for kind in ("train_streamed", "train_in_memory"):
        cases += [
            {"kind": kind, "rows": int(n), "dim": args.dim, "shard_rows": 10 * args.shard_rows}
            for n in args.train_sizes.split(",")
        ]
    rows = []
    for case in cases:
        with tempfile.TemporaryDirectory() as workdir:
            case["workdir"] = workdir
            load = os.getloadavg()[0]
            done = subprocess.run(
                [sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True, check=False
            )
            result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not result:
                raise RuntimeError(f"case {case} failed:\n{done.stderr[-4000:]}")
            row = {"case": case["kind"].replace("_", " "), "load_1m": round(load, 2), **json.loads(result[0][7:])}
            rows.append(row)
            print(row, flush=True)
    print_table(
        "Peak memory of streaming extraction and training (CPU)",
        rows,
        ["case", "rows", "shards", "seconds", "rise_mib", "peak_rss_mib", "load_1m"],
    )
    write_results("streaming", {"machine": machine(torch.device("cpu")), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
