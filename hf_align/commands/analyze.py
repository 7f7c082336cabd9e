"""`hf-align analyze`: modality gap, Wasserstein distances, alignment/uniformity and plots, before and after alignment.

Reads a feature cache folder (or builds the synthetic task's with `--features synthetic`) and, with `--model`, a
saved aligner, then writes `analysis.json` and the plots of `hf_align.experiments.geometry.analyze`: "before" = the raw
tapped features (when both encoders' layers have the same width), "after" = the aligner's embeddings. Prints one line
per stage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .base import CommandSpec


@dataclass
class AnalyzeArguments:
    features: str = field(
        metadata={
            "help": "Feature cache folder (from extract_features or save_to_disk), or 'synthetic' for the "
            "synthetic task."
        }
    )
    output_dir: str = field(metadata={"help": "Where analysis.json and the plots are written."})
    model: str | None = field(default=None, metadata={"help": "Saved aligner folder for the 'after' stage (optional)."})
    vision_layer: int | None = field(
        default=None,
        metadata={"help": "Cached vision layer for 'before' (default: the aligner's layer, else the last)."},
    )
    text_layer: int | None = field(
        default=None, metadata={"help": "Cached text layer for 'before' (default: the aligner's layer, else the last)."}
    )
    max_samples: int = field(default=2000, metadata={"help": "Rows analysed (random subset; exact OT is O(n^3))."})
    seed: int = 0
    plots: bool = True


def run(args: AnalyzeArguments) -> int:
    from ..experiments.compare import synthetic_features
    from ..experiments.geometry import analyze
    from ..features import open_feature_cache
    from ..model.modeling import AlignerModel

    model = AlignerModel.from_pretrained(args.model, load_encoders=False) if args.model else None
    features = synthetic_features() if args.features == "synthetic" else open_feature_cache(args.features)
    report = analyze(
        features, args.output_dir, model, args.vision_layer, args.text_layer, args.max_samples, args.seed, args.plots
    )
    for stage, stats in report["stages"].items():
        if not stats.get("applicable"):
            print(f"{stage}: not applicable ({stats['reason']})")
            continue
        pairs = stats["pair_similarity"]
        print(
            f"{stage}: gap {stats['modality_gap']:.4f}  gaussian W2 {stats['gaussian_w2']:.4f}  "
            f"sample W2 {stats['sample_w2']:.4f}  alignment {stats['alignment']:.4f}  "
            f"uniformity {stats['uniformity']:.4f}  matched {pairs['matched_mean']:.3f} vs random "
            f"{pairs['random_mean']:.3f}"
        )
    print(f"report: {os.path.join(args.output_dir, 'analysis.json')}")
    return 0


COMMAND = CommandSpec("analyze", __doc__.split(": ", 1)[1].split("\n")[0], (AnalyzeArguments,), run)
