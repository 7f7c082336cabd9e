"""`hf-align compare`: train methods × similarity heads on one feature cache with one budget and seeds; leaderboard.

Every combination gets the same training arguments (the `AlignmentArguments` flags: steps, batch size, learning
rate, ...) and the same seeds, and is scored on one held-out split. Prints the leaderboard as Markdown and writes
`leaderboard.md` and `leaderboard.json` into `--output_dir`. `--features synthetic` runs on the synthetic
limited-data task; then, for every setting still at its default, a preset sized for that task is used (see
`hf_align.experiments.compare.SYNTHETIC_PRESET`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from ..training.loop import AlignmentArguments
from .base import CommandSpec


@dataclass
class CompareArguments:
    features: str = field(
        default="synthetic",
        metadata={
            "help": "Feature cache folder (extract_features / save_to_disk), or 'synthetic' (the synthetic task)."
        },
    )
    test_features: str | None = field(
        default=None,
        metadata={"help": "Held-out feature cache (default: --test_fraction of the images of --features)."},
    )
    methods: str | None = field(
        default=None, metadata={"help": "Comma-separated method names (default: all registered)."}
    )
    similarities: str | None = field(
        default=None, metadata={"help": "Comma-separated similarity heads (default: all)."}
    )
    seeds: str = field(default="0,1,2", metadata={"help": "Comma-separated training seeds, the same for every run."})
    test_fraction: float = 0.2
    split_seed: int = 0
    label_column: str = field(default="label", metadata={"help": "Class column for zero-shot ('' to skip)."})
    vision_layer: int = -1
    text_layer: int = -1
    method_kwargs: str = field(default="{}", metadata={"help": 'JSON: {"linear": {"projection_dim": 64}, ...}'})
    similarity_kwargs: str = field(default="{}", metadata={"help": 'JSON: {"mlp": {"hidden_dim": 128}, ...}'})
    model_kwargs: str = field(
        default="{}", metadata={"help": 'JSON settings for every model, e.g. {"temperature": 0.05}'}
    )
    rank_by: str = field(default="mean_R@1", metadata={"help": "Metric the table is sorted by, e.g. zero_shot_top1."})
    synthetic_size: int = field(
        default=3000, metadata={"help": "Pairs of the synthetic task (with --features synthetic)."}
    )


def _json(name: str, value) -> dict:
    parsed = json.loads(value) if isinstance(value, str) else dict(value or {})
    if not isinstance(parsed, dict):
        raise ValueError(f"{name} must be a JSON object, got {value!r}")
    return parsed


def _names(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def run(args: CompareArguments, training_args: AlignmentArguments) -> int:
    from ..experiments.compare import SYNTHETIC_PRESET, compare, synthetic_features
    from ..features import open_feature_cache

    if training_args.output_dir is None:
        raise ValueError("hf-align compare needs --output_dir (where leaderboard.md and leaderboard.json go)")
    method_kwargs = _json("method_kwargs", args.method_kwargs)
    similarity_kwargs = _json("similarity_kwargs", args.similarity_kwargs)
    if args.features == "synthetic":
        features = synthetic_features(n=args.synthetic_size)
        method_kwargs = {**SYNTHETIC_PRESET["method_kwargs"], **method_kwargs}
        similarity_kwargs = {**SYNTHETIC_PRESET["similarity_kwargs"], **similarity_kwargs}
        defaults = AlignmentArguments()
        budget = {
            k: v for k, v in SYNTHETIC_PRESET["training"].items() if getattr(training_args, k) == getattr(defaults, k)
        }
        training_args = dataclasses.replace(training_args, **budget)
    else:
        features = open_feature_cache(args.features)
    test_features = open_feature_cache(args.test_features) if args.test_features else None
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    board = compare(
        features,
        methods=_names(args.methods),
        similarities=_names(args.similarities),
        seeds=seeds,
        args=training_args,
        test_features=test_features,
        test_fraction=args.test_fraction,
        split_seed=args.split_seed,
        label_column=args.label_column or None,
        vision_layer=args.vision_layer,
        text_layer=args.text_layer,
        method_kwargs=method_kwargs,
        similarity_kwargs=similarity_kwargs,
        model_kwargs=_json("model_kwargs", args.model_kwargs),
        output_dir=training_args.output_dir,
        rank_by=args.rank_by,
    )
    print(board.to_markdown())
    print(f"leaderboard written to {training_args.output_dir}/leaderboard.md and leaderboard.json")
    return 0


COMMAND = CommandSpec("compare", __doc__.split(": ", 1)[1].split("\n")[0], (CompareArguments, AlignmentArguments), run)
