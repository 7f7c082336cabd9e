"""`hf-align benchmark`: zero-shot classification and retrieval suites on a saved aligner, clip_benchmark style.

Datasets are image-folders, caption folders, `save_to_disk` folders, Hub ids or clip_benchmark's standard names (see
`hf_align.evaluation.benchmark`). Writes `benchmark.csv`, `benchmark.json` and `benchmark.png` to `--output_dir`,
prints the table, and records every result on the model's card data; a local aligner folder gets its `README.md`
rewritten
with them (the card's model-index).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .base import CommandSpec


@dataclass
class BenchmarkArguments:
    model: str = field(metadata={"help": "Saved aligner: local folder or Hub id."})
    datasets: str = field(
        metadata={
            "help": "Comma-separated datasets, each 'name=source' (source: a folder or Hub dataset id), a folder, or "
            "a clip_benchmark standard name (cifar10, imagenet1k, flickr30k, ...: its Hub copy)."
        }
    )
    output_dir: str = field(metadata={"help": "Where benchmark.csv, benchmark.json and benchmark.png are written."})
    split: str = field(default="test", metadata={"help": "Split of Hub and save_to_disk datasets."})
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration of the Hub datasets."})
    batch_size: int = 64


def run(args: BenchmarkArguments) -> int:
    from ..evaluation.benchmark import BenchmarkDataset, run_benchmark
    from ..model.card import write_model_card
    from ..model.modeling import AlignerModel

    suite = [BenchmarkDataset.parse(s, args.split, args.dataset_config) for s in args.datasets.split(",") if s.strip()]
    model = AlignerModel.from_pretrained(args.model)
    result = run_benchmark(model, suite, args.output_dir, batch_size=args.batch_size)
    for row in result.rows():
        metrics = ", ".join(f"{k} {v:.2f}" for k, v in row.items() if isinstance(v, float))
        print(f"{row['dataset']} ({row['task']}, {row['split']}, {row['num_samples']} images): {metrics}")
    if os.path.isdir(args.model):  # a local aligner: its card now lists these results
        write_model_card(model, args.model)
    for kind, path in result.files.items():
        print(f"{kind}: {path}")
    return 0


COMMAND = CommandSpec("benchmark", __doc__.split(": ", 1)[1].split("\n")[0], (BenchmarkArguments,), run)
