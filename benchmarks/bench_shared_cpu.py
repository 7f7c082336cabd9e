"""A shared CPU: `train()` step times and `extract_features` images/s, quiet and beside a busy neighbour, under torch's
own thread count (``HF_ALIGN_NUM_THREADS=torch``, the behaviour before `hf_align.utils.cpu_threads`) and under
hf_align's ``auto`` policy.

    python benchmarks/bench_shared_cpu.py                       # linear, linear + STRUCTURE, token_relative, extraction
    python benchmarks/bench_shared_cpu.py --neighbour torch     # beside a two-thread torch job instead of a busy loop

The neighbour is started and stopped by the script: ``loop`` is one Python process spinning on one core; ``torch``
is a process running 2-thread matrix products (what a second training job or DataLoader workers look like). Every
figure is the median of `--repeat` measurements taken round-robin over the policies, so a drift in the machine's
load affects both alike. Training: the median interval between optimiser steps of a `train()` run on a synthetic
cache (batch `--batch-size`, 1280-d vision and 384-d text features, the real EfficientNet-Lite0 + MiniLM widths).
Extraction: the real EfficientNet-Lite0 + MiniLM towers over `--n-images` digits. Results: results/shared_cpu.json.
Say the load average printed at the top beside the figures: other jobs on the machine count as neighbours too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import torch
from _common import machine, print_table, write_results
from bench_training import step_time

from hf_align import AlignerModel
from hf_align.features import extract_features, features_from_tensors
from hf_align.testing import make_paired_task
from hf_align.utils.cpu_threads import ENV_VAR

POLICIES = ("torch", "auto")
NEIGHBOURS = {
    "loop": "while True: pass",
    "torch": (
        "import torch; torch.set_num_threads(2); a = torch.randn(512, 512)\nwhile True: a = torch.tanh(a @ a * 1e-3)"
    ),
}


@contextmanager
def neighbour(kind: str | None):
    """A busy process beside this one for the duration of the block (none when `kind` is None)."""
    if kind is None:
        yield
        return
    process = subprocess.Popen([sys.executable, "-c", NEIGHBOURS[kind]], env={**os.environ, "OMP_NUM_THREADS": "2"})
    time.sleep(1.0)  # let it reach its loop
    try:
        yield
    finally:
        process.kill()
        process.wait()


@contextmanager
def policy(name: str):
    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV_VAR)
        else:
            os.environ[ENV_VAR] = previous


def pooled_cache(n: int):
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(n, 32, generator=g)
    vision = latent @ torch.randn(32, 1280, generator=g) + 0.5 * torch.randn(n, 1280, generator=g)
    text = latent @ torch.randn(32, 384, generator=g) + 0.5 * torch.randn(n, 384, generator=g)
    return features_from_tensors({0: vision}, {0: text})


def training_workloads(args) -> dict:
    pooled = pooled_cache(args.n_pairs)
    tokens = make_paired_task(
        n=args.n_pairs,
        vision_dim=384,
        text_dim=384,
        n_vision_layers=1,
        n_text_layers=1,
        tokens=True,
        n_patches=16,
        max_text_tokens=8,
    ).to_features(with_labels=False)

    def linear(**kwargs):
        return lambda: AlignerModel.from_feature_dims(1280, 384, method="linear", projection_dim=512, **kwargs)

    def token_relative():
        return AlignerModel.from_feature_dims(384, 384, method="token_relative", num_anchors=256)

    return {
        "train linear": (linear(), pooled),
        "train linear + STRUCTURE": (linear(structure_weight=10.0), pooled),
        "train token_relative": (token_relative, tokens),
    }


def train_ms(factory, cache, args) -> float:
    return 1000 * step_time(factory, cache, args.warmup, args.steps, args.batch_size, torch.device("cpu"))


def extraction_images_per_s(args, work_dir: str) -> float:
    from hf_align.experiments.digits import digits_dataset
    from hf_align.testing import efficientnet_lite0_path, minilm_path

    model = AlignerModel.from_encoders(efficientnet_lite0_path(), minilm_path(), projection_dim=256)
    data = digits_dataset(args.n_images)
    start = time.perf_counter()
    extract_features(model, model.processor, data, batch_size=32, cache_path=os.path.join(work_dir, "cache"))
    seconds = time.perf_counter() - start
    shutil.rmtree(os.path.join(work_dir, "cache"))  # the next measurement extracts again instead of loading it
    return args.n_images / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neighbour", choices=sorted(NEIGHBOURS), default="loop")
    parser.add_argument("--n-pairs", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip-extraction", action="store_true")
    parser.add_argument("--results-name", default="shared_cpu", help="results/<name>.json")
    args = parser.parse_args()
    if "OMP_NUM_THREADS" in os.environ:
        parser.error("unset OMP_NUM_THREADS: it fixes torch's thread count and hides what the policies do")
    info = machine(torch.device("cpu"))
    print(f"machine: {info}")

    workloads = training_workloads(args)
    measurements: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as work_dir:
        for setting in ("quiet", "busy"):
            with neighbour(args.neighbour if setting == "busy" else None):
                for _ in range(args.repeat):
                    for name in POLICIES:
                        with policy(name):
                            for label, (factory, cache) in workloads.items():
                                value = train_ms(factory, cache, args)
                                measurements.setdefault((label, name, setting), []).append(value)
                            if not args.skip_extraction:
                                value = extraction_images_per_s(args, work_dir)
                                measurements.setdefault(("extract (img/s)", name, setting), []).append(value)

    rows = []
    for (label, name, setting), values in measurements.items():
        if setting != "quiet":
            continue
        quiet, busy = statistics.median(values), statistics.median(measurements[(label, name, "busy")])
        # Step times grow under load, rates shrink: the slowdown is busy/quiet for one and quiet/busy for the other.
        slowdown = quiet / busy if label.startswith("extract") else busy / quiet
        rows.append({"workload": label, "policy": name, "quiet": quiet, "busy": busy, "slowdown": slowdown})
    title = f"step ms / images per s, quiet and beside a '{args.neighbour}' neighbour ({os.cpu_count()} cores)"
    print_table(title, rows, ["workload", "policy", "quiet", "busy", "slowdown"])
    write_results(args.results_name, {"machine": info, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
