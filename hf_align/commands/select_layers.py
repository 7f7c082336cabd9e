"""`hf-align select-layers`: score every (vision layer, text layer) pair of a feature cache and write the report
(JSON) and a heatmap (PNG)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .arguments import parse_layer_list
from .base import CommandSpec

REPORT_FILE = "layer_selection.json"
HEATMAP_FILE = "layer_selection.png"


@dataclass
class SelectLayersArguments:
    features: str = field(
        metadata={
            "help": "Feature cache folder holding all layers: an extract_features cache or a save_to_disk folder."
        }
    )
    output_dir: str = field(metadata={"help": f"Where {REPORT_FILE} and {HEATMAP_FILE} are written."})
    metric: str = field(default="mutual_knn", metadata={"help": "mutual_knn | cka | unbiased_cka"})
    n_samples: int = field(default=5000, metadata={"help": "Pairs sampled from the cache (one caption per image)."})
    seed: int = 0
    k: str = field(default="rice", metadata={"help": "Neighbours for mutual_knn: an int, or rice | sqrt | sturges."})
    vision_layers: str | None = field(
        default=None, metadata={"help": "Candidate vision layers '0,4,8' (default: all)."}
    )
    text_layers: str | None = field(default=None, metadata={"help": "Candidate text layers (default: all)."})
    split: str = field(default="train", metadata={"help": "Split to use when the folder holds a DatasetDict."})
    normalize: bool = field(
        default=True, metadata={"help": "L2-normalise rows before scoring, as the STRUCTURE authors do."}
    )

    def resolved_k(self) -> int | str:
        return int(self.k) if self.k.lstrip("-").isdigit() else self.k


def run(args: SelectLayersArguments) -> int:
    from ..features import open_feature_cache
    from ..training.layer_selection import select_layers

    report = select_layers(
        open_feature_cache(args.features, args.split),
        metric=args.metric,
        n_samples=args.n_samples,
        seed=args.seed,
        k=args.resolved_k(),
        vision_layers=parse_layer_list("vision_layers", args.vision_layers),
        text_layers=parse_layer_list("text_layers", args.text_layers),
        normalize=args.normalize,
    )
    os.makedirs(args.output_dir, exist_ok=True)
    report.save(os.path.join(args.output_dir, REPORT_FILE))
    report.plot(os.path.join(args.output_dir, HEATMAP_FILE))
    vision_layer, text_layer = report.best_pair
    print(
        json.dumps(
            {
                "metric": report.metric,
                "best_vision_layer": vision_layer,
                "best_text_layer": text_layer,
                "best_score": report.best_score,
                "n_samples": report.n_samples,
                "k": report.k,
            },
            indent=2,
        )
    )
    print(f"report and heatmap written to {args.output_dir}")
    return 0


COMMAND = CommandSpec("select-layers", " ".join(__doc__.split(": ", 1)[1].split()), (SelectLayersArguments,), run)
