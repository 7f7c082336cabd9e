"""Methods on the layers layer selection picks, against the towers' own embeddings (issue 23), on the real pair.

    OMP_NUM_THREADS=1 python benchmarks/compare_layer_selection.py --pooled-cache <all-layers digits cache>

The all-layers digits cache of `sweep_defaults.py` (EfficientNet-Lite0 and MiniLM, every hidden state pooled, plus
the towers' own embeddings). For each split (seed s: `sweep_defaults.digits_split`), `select_layers` (mutual k-NN,
its defaults) scores every layer pair on that split's training rows; each method then trains with the library's
defaults on the best pair and is scored as in `sweep_defaults.py` (zero-shot top-1 % on the 360 held-out images).
Results: results/compare_layer_selection.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import sweep_defaults as sweep
import torch
from _common import machine, print_table, write_results

from hf_align import AlignerModel, AlignmentArguments, select_layers, train

STRUCTURE = {"regularizers": {"structure": {}}}
METHODS = {
    "linear": ("linear", {}),
    "linear + STRUCTURE": ("linear", STRUCTURE),
    "mlp + STRUCTURE": ("mlp", STRUCTURE),
    "codebook": ("codebook", {}),
    "csa": ("csa", {}),
}


def column(modality: str, layer: int | str) -> str:
    """The cache column of a candidate layer: `vision_layer_13`, or a pooled embedding (`vision_pooler_output`)."""
    return f"{modality}_{layer}" if isinstance(layer, str) else f"{modality}_layer_{layer}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "hf_align", "sweep"))
    parser.add_argument("--pooled-cache", help="an all-layers digits cache built before (else built in --cache-dir)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    cache = sweep.digits_cache(args.cache_dir, False, args.pooled_cache)
    labels = np.asarray(cache.select(range(0, len(cache), 4))["label"])
    prompts = sweep.prompt_rows(labels)
    runs = []
    for seed in args.seeds:
        split = sweep.digits_split(len(labels), seed)
        vision, text = select_layers(cache.select(split["train"]), seed=seed).best_pair
        names = {column("vision", vision): "vision_layer_0", column("text", text): "text_layer_0"}
        view = cache.select_columns([*names, "image_id", "label"]).rename_columns(names)
        first = view.select([0]).with_format("torch")[0]
        widths = first["vision_layer_0"].shape[-1], first["text_layer_0"].shape[-1]
        for name in args.methods:
            method, kwargs = METHODS[name]
            torch.manual_seed(seed)
            model = AlignerModel.from_feature_dims(*widths, method=method, **kwargs)
            start = time.perf_counter()
            result = train(model, view.select(split["train"]), AlignmentArguments(seed=seed, save_model=False))
            top1 = sweep.zero_shot_top1(model, view, split["test"], prompts)
            runs.append(
                {
                    "method": name,
                    "seed": seed,
                    "layers": [str(vision), str(text)],
                    "top1": top1,
                    "steps": result.global_step,
                    "seconds": time.perf_counter() - start,
                }
            )
            print(runs[-1], flush=True)
    table = []
    for name in args.methods:
        scores = [r["top1"] for r in runs if r["method"] == name]
        spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
        table.append(
            {
                "method": name,
                "top-1": f"{statistics.mean(scores):.1f} ± {spread:.1f}",
                "splits": ", ".join(f"{s:.1f}" for s in scores),
            }
        )
    print_table("methods on the selected layers (digits, zero-shot top-1 %)", table, ["method", "top-1", "splits"])
    write_results("compare_layer_selection", {"machine": machine(torch.device("cpu")), "table": table, "runs": runs})


if __name__ == "__main__":
    main()
