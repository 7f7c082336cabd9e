"""The library's training defaults against the quickstart's tuned recipe, method by method (issue 22).

    OMP_NUM_THREADS=1 python benchmarks/sweep_defaults.py                      # digits (3 splits) + synthetic
    python benchmarks/sweep_defaults.py --seeds 1 2 3 4 --synthetic-sizes 2000 20000 --results-name defaults_big

**Digits, real towers.** The quickstart's data (scikit-learn's 1,797 handwritten digits) through the real
EfficientNet-Lite0 (`pooler_output`, 1280-d) and MiniLM (`sentence_embedding`, 384-d; `last_hidden_state` tokens for
`token_relative`). Features are extracted once, each image with all four quickstart caption templates, into
`--cache-dir` (reused when it is there); a split of seed s holds out 20% of the images (360, as the quickstart) and
gives every training image one template drawn with s, so each split is a quickstart run with another seed. The score
is the quickstart's: zero-shot top-1 (%) on the held-out images against the 10 class prototypes (mean of the four
templates), computed from the cached features.

**Synthetic.** `make_paired_task` (10 clusters, 64-d / 48-d, the shared layer last) with `--synthetic-sizes` training
pairs and 1,000 held-out pairs (tokens for `token_relative`); the score is mean R@1 (%) of held-out retrieval.

**What is compared.** `defaults`: `AlignmentArguments()` and the method's registry defaults, nothing else (the
issue's user). `recipe`: the quickstart's tuned recipe as it ran before the defaults changed: 40 epochs, batch 256,
lr 2e-3, no early stopping, best weights by `eval_loss`, STRUCTURE warmed up over 1,000 steps; asif with 1,024
anchors. Methods: linear, linear + STRUCTURE, mlp + STRUCTURE (STRUCTURE at its defaults: λ "auto", warm-up "auto";
the recipe's λ 10), codebook, token_relative, asif. Every run
validates on 10% of its training images (the default `eval_fraction`).
Results: results/sweep_defaults.json (`--results-name` to write another file).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from _common import machine, print_table, write_results

from hf_align import AlignerModel, AlignmentArguments, train
from hf_align.evaluation import zero_shot_metrics
from hf_align.evaluation.zero_shot_retrieval import embed_feature_cache
from hf_align.experiments.quickstart import CAPTION_TEMPLATES
from hf_align.features import extract_features, open_feature_cache
from hf_align.functional.retrieval import chunked_retrieval_metrics
from hf_align.testing import DIGIT_NAMES, digits_dataset, efficientnet_lite0_path, make_paired_task, minilm_path

# name -> (registry method, from_feature_dims kwargs: STRUCTURE with the library's own settings); the recipe's own
# extras are in RECIPE_MODEL
METHODS = {
    "linear": ("linear", {}),
    "linear + STRUCTURE": ("linear", {"regularizers": {"structure": {}}}),
    "mlp + STRUCTURE": ("mlp", {"regularizers": {"structure": {}}}),
    "codebook": ("codebook", {}),
    "token_relative": ("token_relative", {}),
    "asif": ("asif", {}),
}
RECIPE_TRAINING = dict(
    num_train_epochs=40.0,
    per_device_train_batch_size=256,
    learning_rate=2e-3,
    early_stopping_patience=0,
    metric_for_best_model="eval_loss",
)
RECIPE_MODEL = {
    "structure": {"regularizers": {"structure": {"weight": 10.0, "warmup_steps": 1000}}},
    "asif": {"num_anchors": 1024},
}
TEST_IMAGES = 360  # the quickstart's 20% of 1,797
SYNTHETIC_TEST = 1000


def digits_cache(cache_dir: str, tokens: bool, path: str | None = None):
    """Every digit with its four captions (rows 4·i + t: image i, template t), through the real towers; `path`: a
    cache folder built before (opened, not rebuilt)."""
    if path is not None:
        return open_feature_cache(path)
    data = digits_dataset(None, image_size=32, seed=0)
    # A fixed fingerprint: the cache is found again whichever script builds the captions.
    data = data.map(
        lambda row: {"caption": [t.format(DIGIT_NAMES[row["label"]]) for t in CAPTION_TEMPLATES]},
        new_fingerprint="digits-with-4-quickstart-templates",
    )
    model = AlignerModel.from_encoders(
        efficientnet_lite0_path(), minilm_path(), method="token_relative" if tokens else "linear"
    )
    layers = {} if tokens else {"vision_layers": "all", "text_layers": "all"}
    return extract_features(
        model,
        model.processor,
        data,
        keep_columns=["label"],
        cache_dir=os.path.join(cache_dir, "tokens" if tokens else "pooled"),
        num_workers=0,
        **layers,
    )


def tap_view(features, tokens: bool):
    """The columns the towers' own taps fill, renamed to layer 0 (what a `from_feature_dims` aligner reads)."""
    if tokens:
        names = {
            "vision_tokens_last_hidden_state": "vision_tokens_layer_0",
            "text_tokens_last_hidden_state": "text_tokens_layer_0",
        }
    else:
        names = {"vision_pooler_output": "vision_layer_0", "text_sentence_embedding": "text_layer_0"}
    return features.select_columns([*names, "image_id", "label"]).rename_columns(names)


def digits_split(n_images: int, seed: int) -> dict:
    """Rows of one split: a training row per training image (its template drawn with `seed`), the held-out images'
    first rows, and the 40 prompt rows (class c, template t) the prototypes are made of."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_images)
    test, train_images = np.sort(order[:TEST_IMAGES]), np.sort(order[TEST_IMAGES:])
    templates = rng.integers(0, len(CAPTION_TEMPLATES), len(train_images))
    return {"train": (4 * train_images + templates).tolist(), "test": (4 * test).tolist()}


def prompt_rows(labels: np.ndarray) -> list[int]:
    first = [int(np.flatnonzero(labels == c)[0]) for c in range(len(DIGIT_NAMES))]
    return [4 * image + t for image in first for t in range(len(CAPTION_TEMPLATES))]


@torch.no_grad()
def zero_shot_top1(model, view, test_rows, prompts) -> float:
    model.eval()
    images, _ = embed_feature_cache(model, view.select(test_rows))
    _, texts = embed_feature_cache(model, view.select(prompts))
    prototypes = torch.nn.functional.normalize(texts.view(len(DIGIT_NAMES), len(CAPTION_TEMPLATES), -1).mean(1), dim=-1)
    labels = view.select(test_rows)["label"]
    return zero_shot_metrics(images @ prototypes.t(), labels)["top1"]


def build(name: str, config: str, vision_dim: int, text_dim: int):
    method, kwargs = METHODS[name]
    kwargs = dict(kwargs)
    if config == "recipe":
        if "regularizers" in kwargs:
            kwargs.update(RECIPE_MODEL["structure"])
        kwargs.update(RECIPE_MODEL.get(method, {}))
    return AlignerModel.from_feature_dims(vision_dim, text_dim, method=method, **kwargs)


def training_args(config: str, seed: int) -> AlignmentArguments:
    extra = RECIPE_TRAINING if config == "recipe" else {}
    return AlignmentArguments(seed=seed, save_model=False, logging_steps=1000, **extra)


def run_digits(args, methods, configs) -> list[dict]:
    pooled = digits_cache(args.cache_dir, False, args.pooled_cache)
    token_cache = digits_cache(args.cache_dir, True, args.token_cache) if "token_relative" in methods else None
    labels = np.asarray(pooled.select(range(0, len(pooled), 4))["label"])
    prompts = prompt_rows(labels)
    rows = []
    for seed in args.seeds:
        split = digits_split(len(labels), seed)
        for name in methods:
            tokens = name == "token_relative"
            view = tap_view(token_cache if tokens else pooled, tokens)
            for config in configs:
                torch.manual_seed(seed)
                model = build(name, config, 1280, 384)
                start = time.perf_counter()
                result = train(model, view.select(split["train"]), training_args(config, seed))
                top1 = zero_shot_top1(model, view, split["test"], prompts)
                rows.append(_row("digits", name, config, seed, top1, result, time.perf_counter() - start))
                print(_line(rows[-1]), flush=True)
    return rows


@torch.no_grad()
def retrieval_r1(model, task) -> float:
    model.eval()
    vision = task.vision_tokens[task.shared_layers[0]] if task.vision_tokens else task.vision[task.shared_layers[0]]
    if task.text_tokens:
        images = model.get_image_features(vision_features=vision)
        texts = model.get_text_features(text_features=task.text_tokens[task.shared_layers[1]], text_mask=task.text_mask)
    else:
        images = model.get_image_features(vision_features=vision)
        texts = model.get_text_features(text_features=task.text[task.shared_layers[1]])
    return chunked_retrieval_metrics(images, texts, torch.arange(len(texts)))["mean_R@1"]


def run_synthetic(args, methods, configs) -> list[dict]:
    rows = []
    for size in args.synthetic_sizes:
        for seed in args.synthetic_seeds:
            for name in methods:
                tokens = name == "token_relative"
                if tokens and size > args.max_token_size:
                    continue
                task = make_paired_task(n=size + SYNTHETIC_TEST, seed=seed, tokens=tokens)
                train_task, test_task = task.split(size)
                features = train_task.to_features()
                if tokens:  # token methods read the token columns only
                    features = features.select_columns(
                        [c for c in features.column_names if "tokens" in c or c in ("image_id", "label")]
                    )
                dims = task.vision[0].shape[1], task.text[0].shape[1]
                for config in configs:
                    torch.manual_seed(seed)
                    model = build(name, config, *dims)
                    start = time.perf_counter()
                    result = train(model, features, training_args(config, seed))
                    score = retrieval_r1(model, test_task)
                    rows.append(
                        _row(f"synthetic {size}", name, config, seed, score, result, time.perf_counter() - start)
                    )
                    print(_line(rows[-1]), flush=True)
    return rows


def _row(task, name, config, seed, score, result, seconds) -> dict:
    return {
        "task": task,
        "method": name,
        "config": config,
        "seed": seed,
        "score": score,
        "steps": result.global_step,
        "total_steps": result.total_steps,
        "best_step": result.best_step,
        "early_stopped": result.early_stopped,
        "seconds": seconds,
    }


def _line(row: dict) -> str:
    return (
        f"{row['task']:>16} | {row['method']:>18} | {row['config']:>8} | seed {row['seed']} | {row['score']:5.1f} | "
        f"{row['steps']}/{row['total_steps']} steps, best {row['best_step']} | {row['seconds']:.1f}s"
    )


def summarise(rows: list[dict], configs) -> list[dict]:
    table = []
    for task in dict.fromkeys(r["task"] for r in rows):
        for name in dict.fromkeys(r["method"] for r in rows if r["task"] == task):
            entry = {"task": task, "method": name}
            for config in configs:
                scores = [r["score"] for r in rows if (r["task"], r["method"], r["config"]) == (task, name, config)]
                if scores:
                    spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
                    entry[config] = f"{statistics.mean(scores):.1f} ± {spread:.1f}"
                    entry[f"{config}_mean"] = statistics.mean(scores)
            if "defaults_mean" in entry and "recipe_mean" in entry:
                entry["defaults − recipe"] = round(entry["defaults_mean"] - entry["recipe_mean"], 1)
            table.append(entry)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "hf_align", "sweep"))
    parser.add_argument("--pooled-cache", help="an all-layers digits cache built before (else built in --cache-dir)")
    parser.add_argument("--token-cache", help="a token digits cache built before (else built in --cache-dir)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="digits splits (quickstart: 0)")
    parser.add_argument("--synthetic-sizes", type=int, nargs="*", default=[2000, 20000])
    parser.add_argument("--synthetic-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max-token-size", type=int, default=2000, help="largest synthetic size for token_relative")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--configs", nargs="+", default=["defaults", "recipe"], choices=["defaults", "recipe"])
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--results-name", default="sweep_defaults")
    args = parser.parse_args()
    rows = [] if args.skip_digits else run_digits(args, args.methods, args.configs)
    rows += run_synthetic(args, args.methods, args.configs)
    table = summarise(rows, args.configs)
    columns = ["task", "method", *args.configs, "defaults − recipe"]
    print_table("defaults vs the quickstart recipe (digits: zero-shot top-1 %, synthetic: mean R@1 %)", table, columns)
    write_results(args.results_name, {"machine": machine(torch.device("cpu")), "table": table, "runs": rows})


if __name__ == "__main__":
    main()
