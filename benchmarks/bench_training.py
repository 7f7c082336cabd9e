"""Training on the feature cache: step time and pairs/s of every registered method through `hf_align.train`.

    python benchmarks/bench_training.py                         # CPU-sized default: batch 1024, 384-d features
    python benchmarks/bench_training.py --batch-size 4096 --steps 200 --n-pairs 1000000   # the issue's GPU setting

Each method trains on a synthetic pooled cache (`--n-pairs` x `--dim`, token methods on a token cache of
`--token-pairs` pairs, 16 patches and 2-8 text tokens) with `train()` itself, so the figure includes everything a real
run pays per step (batch gather, forward, backward, AdamW, scheduler, the non-finite check). A step's time is the
interval between two consecutive `after_optimizer_step` calls (which `train()` makes once per optimiser step); the
table gives the median over `--steps` steps after `--warmup` steps, the fastest of `--repeat` round-robin rounds. A
training-free method (asif) reports the time of its whole `train()` call (setup + `init_from_data`).

Two floors: `bare linear` is the same linear aligner, InfoNCE and AdamW in a minimal loop; `token_relative, model
step` is the token method's own step (the model's forward and loss, backward, AdamW) on one token batch already in
memory, without `train()`'s per-batch Arrow read.

On a machine shared with other jobs, wall-clock steps stretch with the others' load (and unevenly: the load moves
between rows of one run). `--threads 1 --clock cpu` times this process's CPU time instead (`time.process_time`, which
counts every thread of the process): one thread does all the work and the other jobs' time is not counted, so the
figures are per-core step times and their ratios hold under load (memory-bandwidth and cache contention remain).
`--compile` adds a row of linear with `AlignmentArguments(torch_compile=True)`. `--profile` adds torch.profiler's top
operators of a linear and a linear + STRUCTURE run (setup included: the cache is turned into tensors once per
`train()` call).
Results: results/training.json (`--results-name` to write another file).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _common import machine, pick_device, print_table, synchronize, write_results

from hf_align import AlignerModel, AlignmentArguments, train
from hf_align.features import FeatureCollator, features_for, features_from_tensors
from hf_align.methods import METHODS
from hf_align.testing import make_paired_task

# What the step times are read from: wall-clock time by default; `--clock cpu` sets time.process_time (see main).
CLOCK = time.perf_counter


def method_settings(name: str, width: int) -> dict:
    """from_feature_dims kwargs giving each method an embedding of about `width` (registry defaults otherwise)."""
    return {
        "linear": {"projection_dim": width},
        "mlp": {"projection_dim": width},
        "codebook": {"projection_dim": width},
        "relative": {"num_anchors": width},
        "token_relative": {"num_anchors": width},
        "asif": {"num_anchors": width, "topk": min(width, 64)},
    }.get(name, {})


def pooled_cache(n: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 32, generator=g)
    vision = latent @ torch.randn(32, dim, generator=g) + 0.5 * torch.randn(n, dim, generator=g)
    text = latent @ torch.randn(32, dim, generator=g) + 0.5 * torch.randn(n, dim, generator=g)
    return features_from_tensors({0: vision}, {0: text})


def run_seconds(model_factory, cache, steps: int, batch_size: int, device) -> float:
    model = model_factory()
    args = AlignmentArguments(
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        eval_fraction=0.0,
        logging_steps=10**9,
        save_model=False,
        seed=0,
        init_samples=min(10_000, len(cache)),
    )
    synchronize(device)
    start = CLOCK()
    train(model, cache, args)
    synchronize(device)
    return CLOCK() - start


def step_time(model_factory, cache, warmup: int, steps: int, batch_size: int, device, **train_kwargs) -> float:
    """Median seconds between consecutive optimiser steps of a `train()` run, after `warmup` steps."""
    model = model_factory()
    stamps, after_step = [], model.aligner.after_optimizer_step

    def stamped() -> None:
        after_step()
        synchronize(device)
        stamps.append(CLOCK())

    model.aligner.after_optimizer_step = stamped
    args = AlignmentArguments(
        max_steps=warmup + steps + 1,
        per_device_train_batch_size=batch_size,
        eval_fraction=0.0,
        logging_steps=10**9,
        save_model=False,
        seed=0,
        init_samples=min(10_000, len(cache)),
        **train_kwargs,
    )
    train(model, cache, args)
    return statistics.median(b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :]))


def bare_linear_step(dim: int, width: int, batch_size: int, steps: int, device) -> float:
    """The floor: two linear maps, normalisation, CLIP loss, AdamW; inputs already on the device."""
    torch.manual_seed(0)
    vision, text = (
        torch.nn.Linear(dim, width, bias=False).to(device),
        torch.nn.Linear(dim, width, bias=False).to(device),
    )
    optimizer = torch.optim.AdamW([*vision.parameters(), *text.parameters()], lr=1e-3)
    x, y = torch.randn(batch_size, dim, device=device), torch.randn(batch_size, dim, device=device)
    targets = torch.arange(batch_size, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            logits = 100.0 * F.normalize(vision(x), dim=-1) @ F.normalize(text(y), dim=-1).t()
        loss = 0.5 * (F.cross_entropy(logits.float(), targets) + F.cross_entropy(logits.float().t(), targets))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return median_step_seconds(step, steps, device)


def bare_model_step(name: str, settings: dict, cache, dim: int, batch_size: int, steps: int, device) -> float:
    """A method's own step (the model's forward and loss, backward, AdamW) on one batch already on the device: the
    method's cost without `train()`'s batch gather (for token caches, an Arrow read and a padding loop per batch)."""
    torch.manual_seed(0)
    model = AlignerModel.from_feature_dims(dim, dim, method=name, **settings).to(device)
    view = features_for(model, cache).with_format("numpy", columns=["vision_features", "text_features"])
    rows = view[: min(batch_size, len(view))]
    batch = {
        k: v.to(device) if isinstance(v, torch.Tensor) else v
        for k, v in FeatureCollator()({k: list(v) for k, v in rows.items()}).items()
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return median_step_seconds(step, steps, device)


def median_step_seconds(step, steps: int, device) -> float:
    """Median wall-clock seconds of `step()` (device work included) over `steps` calls after 3 warm-up calls."""
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = CLOCK()
        step()
        synchronize(device)
        times.append(CLOCK() - start)
    return statistics.median(times)


def measure(label: str, name: str, settings: dict, pooled, args, device, caches: dict) -> dict:
    """One table row: the method's median step time through `train()` (or its whole call if training-free)."""
    method = METHODS[name]
    cache = token_cache(args, caches) if method.input_kind == "tokens" else pooled
    train_kwargs = settings.get("train", {})  # AlignmentArguments of this row (e.g. torch_compile)
    model_settings = {key: value for key, value in settings.items() if key != "train"}

    def factory():
        return AlignerModel.from_feature_dims(args.dim, args.dim, method=name, **model_settings)

    if not method.trainable:
        return {
            "method": label,
            "kind": "training-free",
            "train_call_s": run_seconds(factory, cache, 1, args.batch_size, device),
        }
    batch = min(args.batch_size, len(cache))
    seconds = step_time(factory, cache, args.warmup, args.steps, batch, device, **train_kwargs)
    return {
        "method": label,
        "kind": method.input_kind,
        "batch": batch,
        "step_ms": 1e3 * seconds,
        "pairs_per_s": batch / seconds,
    }


def token_cache(args, caches: dict):
    """The synthetic token cache (`--token-pairs` pairs, 16 patches, 2-8 text tokens), built once per run."""
    if "tokens" not in caches:
        task = make_paired_task(
            n=args.token_pairs,
            vision_dim=args.dim,
            text_dim=args.dim,
            n_vision_layers=1,
            n_text_layers=1,
            tokens=True,
            n_patches=16,
            max_text_tokens=8,
        )
        caches["tokens"] = task.to_features(with_labels=False)
    return caches["tokens"]


def op_profile(name: str, settings: dict, pooled, args, device) -> list[dict]:
    """The operators taking the most self time (CUDA time on a GPU) in a `train()` run of `args.steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    model = AlignerModel.from_feature_dims(args.dim, args.dim, method=name, **settings)
    train_args = AlignmentArguments(
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        eval_fraction=0.0,
        logging_steps=10**9,
        save_model=False,
        seed=0,
    )
    with profile(activities=activities) as prof:
        train(model, pooled, train_args)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events)
    return [
        {"op": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total}
        for e in events[:12]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-pairs", type=int, default=50_000)
    parser.add_argument("--token-pairs", type=int, default=4_000)
    parser.add_argument("--dim", type=int, default=384, help="width of the cached features (both modalities)")
    parser.add_argument("--width", type=int, default=256, help="embedding width (projection_dim / num_anchors)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=2, help="round-robin rounds; each method's fastest is kept")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", default="all", help="comma-separated registry names, or 'all'")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (CPU runs only), which other jobs do not inflate",
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--compile", action="store_true", help="add linear with torch_compile=True")
    parser.add_argument("--results-name", default="training", help="results/<name>.json")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.clock == "cpu":
        if device.type != "cpu":
            parser.error(f"--clock cpu times CPU work only; the run is on {device} (use --clock wall)")
        global CLOCK
        CLOCK = time.process_time
    names = sorted(METHODS) if args.methods == "all" else args.methods.split(",")
    pooled = pooled_cache(args.n_pairs, args.dim)
    caches: dict[str, object] = {}
    runs = []
    for name in names:
        runs.append((name, name, method_settings(name, args.width)))
        if name == "linear":
            structure = {"structure_weight": 10.0, "structure_levels": 1, "structure_warmup_steps": 0}
            runs.append(("linear + structure (L=1)", name, {**method_settings(name, args.width), **structure}))
            if args.compile:
                compiled = {**method_settings(name, args.width), "train": {"torch_compile": True}}
                runs.append(("linear, torch_compile", name, compiled))
        if name == "codebook":  # at batch < num_codes the default SwAV queue makes each Sinkhorn step B + queue rows
            runs.append(("codebook, no queue", name, {**method_settings(name, args.width), "queue_length": 0}))

    # Round-robin repeats, fastest kept: on a shared machine the other jobs' load only ever slows a step down.
    best: dict[str, dict] = {}
    for _ in range(args.repeat):
        for label, name, settings in runs:
            row = measure(label, name, settings, pooled, args, device, caches)
            key = "train_call_s" if "train_call_s" in row else "step_ms"
            if label not in best or row[key] < best[label][key]:
                best[label] = row
        floors = {
            ("bare linear (floor)", "pooled"): bare_linear_step(
                args.dim, args.width, args.batch_size, max(args.steps, 5), device
            )
        }
        if "token_relative" in names:
            cache = token_cache(args, caches)
            settings = method_settings("token_relative", args.width)
            floors[("token_relative, model step (floor)", "tokens")] = bare_model_step(
                "token_relative", settings, cache, args.dim, args.batch_size, max(args.steps, 5), device
            )
        for (label, kind), seconds in floors.items():
            if label not in best or 1e3 * seconds < best[label]["step_ms"]:
                batch = args.batch_size if kind == "pooled" else min(args.batch_size, args.token_pairs)
                best[label] = {
                    "method": label,
                    "kind": kind,
                    "batch": batch,
                    "step_ms": 1e3 * seconds,
                    "pairs_per_s": batch / seconds,
                }
    rows = list(best.values())
    by_name = {row["method"]: row for row in rows}

    if "linear" in by_name:
        linear = by_name["linear"]["step_ms"]
        for row in rows:
            if "step_ms" in row:
                row["x linear"] = row["step_ms"] / linear

    profile = {}
    if args.profile:
        for label, name, settings in runs:
            if label in ("linear", "linear + structure (L=1)"):
                profile[label] = op_profile(name, settings, pooled, args, device)
                print_table(
                    f"torch.profiler, {label}: top operators over {args.steps} train() steps (self time)",
                    profile[label],
                    ["op", "calls", "self_ms", "share"],
                )

    print_table(
        f"Training on the cache ({device}, features {args.dim}-d, embedding {args.width}, {args.n_pairs} pairs)",
        rows,
        ["method", "kind", "batch", "step_ms", "pairs_per_s", "x linear", "train_call_s"],
    )
    write_results(args.results_name, {"machine": machine(device), "args": vars(args), "rows": rows, "profile": profile})


if __name__ == "__main__":
    main()
