"""`hf-align data-efficiency`: held-out retrieval against the number of training images (all their captions), for an
aligner with and without STRUCTURE on the last and the selected layers, from one feature cache (or the offline
synthetic task)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .arguments import parse_layer_list
from .base import CommandSpec


@dataclass
class DataEfficiencyArguments:
    output_dir: str = field(metadata={"help": "Where data_efficiency.json / .md / .png are written."})
    features: str | None = field(
        default=None,
        metadata={"help": "Feature cache folder with all layers (extract_features cache or save_to_disk)."},
    )
    split: str = field(default="train", metadata={"help": "Split to use when the folder holds a DatasetDict."})
    synthetic: bool = field(default=False, metadata={"help": "Use the synthetic clustered task instead of a cache."})
    synthetic_pairs: int = field(default=12000, metadata={"help": "Pairs in the synthetic task."})
    synthetic_shared_layers: str = field(
        default="1,1", metadata={"help": "Synthetic (vision, text) layer pair carrying the shared latent (of 3 each)."}
    )
    sizes: str = field(
        default="1000,2500,5000,10000,25000,50000",
        metadata={"help": "Training sizes n (images, each with all its captions)."},
    )
    include_all: bool = field(default=False, metadata={"help": "Also train on every image left after the test split."})
    seeds: str = "0,1,2"
    n_test: int = field(default=1000, metadata={"help": "Held-out images."})
    method: str = field(default="linear", metadata={"help": "Aligner method (registry name)."})
    method_kwargs: str = field(default="{}", metadata={"help": 'JSON object, e.g. {"projection_dim": 512}.'})
    structure: str = field(
        default='{"weight": 10.0}',
        metadata={"help": 'STRUCTURE settings (JSON, no prefix), e.g. {"weight": 10, "levels": 2}.'},
    )
    metric: str = field(default="mean_R@1", metadata={"help": "Retrieval metric tabulated and plotted."})
    selection_metric: str = field(default="mutual_knn", metadata={"help": "Layer-selection score."})
    selection_samples: int = field(default=5000, metadata={"help": "Pairs scored by layer selection (≤ n)."})
    max_steps: int = field(default=500, metadata={"help": "Optimiser steps per run (the same for every n)."})
    per_device_train_batch_size: int = field(default=1024, metadata={"help": "Batch (capped at n)."})
    learning_rate: float = 1e-3
    mixed_precision: str = field(default="auto", metadata={"help": "no | bf16 | fp16 | auto"})


def _json_object(name: str, text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {text!r}")
    return value


def _ints(name: str, text: str) -> list[int]:
    values = parse_layer_list(name, text)
    if not isinstance(values, list) or not values:
        raise ValueError(f"{name} must be comma-separated ints, got {text!r}")
    return values


def run(args: DataEfficiencyArguments) -> int:
    from ..experiments.data_efficiency import default_variants, run_data_efficiency
    from ..training.loop import AlignmentArguments

    if args.synthetic == (args.features is not None):
        raise ValueError("give exactly one of --features <cache folder> or --synthetic")
    if args.synthetic:
        from ..experiments.synthetic import make_paired_task

        shared = _ints("synthetic_shared_layers", args.synthetic_shared_layers)
        if len(shared) != 2:
            raise ValueError(
                f"synthetic_shared_layers must be two ints 'vision,text', got {args.synthetic_shared_layers!r}"
            )
        features = make_paired_task(n=args.synthetic_pairs, shared_layers=tuple(shared), seed=0).to_features()
    else:
        from ..features import open_feature_cache

        features = open_feature_cache(args.features, args.split)
    result = run_data_efficiency(
        features,
        sizes=_ints("sizes", args.sizes),
        seeds=_ints("seeds", args.seeds),
        variants=default_variants(
            args.method, _json_object("method_kwargs", args.method_kwargs), _json_object("structure", args.structure)
        ),
        n_test=args.n_test,
        training_args=AlignmentArguments(
            max_steps=args.max_steps,
            per_device_train_batch_size=args.per_device_train_batch_size,
            learning_rate=args.learning_rate,
            eval_fraction=0.0,
            mixed_precision=args.mixed_precision,
        ),
        include_all=args.include_all,
        selection_kwargs={"metric": args.selection_metric, "n_samples": args.selection_samples},
        metric=args.metric,
        output_dir=args.output_dir,
    )
    print(result.to_markdown())
    print(f"results written to {args.output_dir}")
    return 0


COMMAND = CommandSpec("data-efficiency", " ".join(__doc__.split(": ", 1)[1].split()), (DataEfficiencyArguments,), run)
