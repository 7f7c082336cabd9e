"""The vision tower's forward during extraction on CPU, for a convnet (the real EfficientNet-Lite0): images/s of the
bare fp32 NCHW forward against `torch.inference_mode`, `channels_last`, bf16 autocast and `torch.compile`, each in the
same run, and how far each one's features are from the bare forward's.

    python benchmarks/bench_convnet_cpu.py                  # batch 32, 3 rounds
    python benchmarks/bench_convnet_cpu.py --no-compile     # skip torch.compile (its first call compiles: minutes)

Extraction asks the tower for every hidden state (`output_hidden_states=True`), so each variant does too. The
figure is the best of `--repeat` round-robin rounds (other jobs only ever slow a round down); the features column
is the largest absolute difference from the bare forward over the pooled output and every hidden state, divided by
the largest absolute value of the bare forward's. bf16 runs only where the CPU has bf16 instructions
(avx512_bf16 / AMX) and is reported, not used by default: hf_align keeps fp32 features unless asked. Results:
results/convnet_cpu.json. Say the load average printed at the top beside the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from _common import machine, print_table, write_results
from transformers import EfficientNetModel

from hf_align.testing import efficientnet_lite0_path


def cpu_has_bf16() -> bool:
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        flags = handle.read()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def variants(model: EfficientNetModel, compile_tower: bool) -> dict:
    """name -> (module, input memory format, context factory)."""
    last = EfficientNetModel.from_pretrained(efficientnet_lite0_path()).eval().to(memory_format=torch.channels_last)
    out = {
        "bare (no_grad, NCHW fp32)": (model, torch.contiguous_format, torch.no_grad),
        "inference_mode": (model, torch.contiguous_format, torch.inference_mode),
        "channels_last": (last, torch.channels_last, torch.no_grad),
        "channels_last + inference_mode": (last, torch.channels_last, torch.inference_mode),
    }
    if cpu_has_bf16():

        def bf16():
            stack = contextlib.ExitStack()
            stack.enter_context(torch.inference_mode())
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            return stack

        out["channels_last + inference_mode + bf16 autocast"] = (last, torch.channels_last, bf16)
    if compile_tower:
        out["torch.compile + inference_mode"] = (torch.compile(model), torch.contiguous_format, torch.inference_mode)
    return out


def forward(module, pixel_values, context):
    with context():
        output = module(pixel_values=pixel_values, output_hidden_states=True)
    return [output.pooler_output.float(), *(h.float() for h in output.hidden_states)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=2, help="batches per timed round")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--results-name", default="convnet_cpu", help="results/<name>.json")
    args = parser.parse_args()
    info = machine(torch.device("cpu"))
    print(f"machine: {info}")
    torch.manual_seed(0)
    model = EfficientNetModel.from_pretrained(efficientnet_lite0_path()).eval()
    pixels = torch.randn(args.batch_size, 3, 224, 224)
    reference = forward(model, pixels, torch.no_grad)
    runs = variants(model, compile_tower=not args.no_compile)

    rows, best, first_call = {}, {}, {}
    for name, (module, memory_format, context) in runs.items():
        inputs = pixels.contiguous(memory_format=memory_format)
        start = time.perf_counter()
        features = forward(module, inputs, context)  # warm-up; torch.compile compiles here
        first_call[name] = time.perf_counter() - start
        scale = max(r.abs().max().item() for r in reference)
        error = max((f - r).abs().max().item() for f, r in zip(features, reference)) / scale
        rows[name] = {"variant": name, "max |diff| / max |ref|": error, "first call s": first_call[name]}
    for _ in range(args.repeat):
        for name, (module, memory_format, context) in runs.items():
            inputs = pixels.contiguous(memory_format=memory_format)
            start = time.perf_counter()
            for _ in range(args.batches):
                forward(module, inputs, context)
            rate = args.batches * args.batch_size / (time.perf_counter() - start)
            best[name] = max(best.get(name, 0.0), rate)
    bare = best["bare (no_grad, NCHW fp32)"]
    for name, row in rows.items():
        row["images/s"] = best[name]
        row["x bare"] = best[name] / bare
    columns = ["variant", "images/s", "x bare", "max |diff| / max |ref|", "first call s"]
    print_table(f"EfficientNet-Lite0 forward, batch {args.batch_size}, all hidden states", list(rows.values()), columns)
    write_results(args.results_name, {"machine": info, "args": vars(args), "rows": list(rows.values())})


if __name__ == "__main__":
    main()
