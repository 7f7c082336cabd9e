"""`hf-align evaluate`: zero-shot classification and/or retrieval of a saved aligner on a dataset.

Each result is recorded on the model's card data; a local aligner folder gets its `README.md` rewritten with them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .arguments import load_dataset_split
from .base import CommandSpec


@dataclass
class EvaluateArguments:
    model: str = field(metadata={"help": "Saved aligner: local folder or Hub id."})
    dataset: str = field(metadata={"help": "Hub dataset id or a save_to_disk folder."})
    dataset_config: str | None = None
    split: str = "test"
    tasks: str = field(default="zero_shot,retrieval", metadata={"help": "Comma-separated: zero_shot, retrieval."})
    image_column: str = "image"
    text_column: str = "caption"
    label_column: str = "label"
    class_names: str | None = field(default=None, metadata={"help": "Comma-separated (default: ClassLabel names)."})
    templates: str | None = field(default=None, metadata={"help": "'|'-separated prompts with {} (default: CLIP's)."})
    max_samples: int | None = None
    batch_size: int = 64
    output_file: str | None = field(default=None, metadata={"help": "Also write the metrics as JSON here."})


def run(args: EvaluateArguments) -> int:
    from ..evaluation.zero_shot_retrieval import evaluate_retrieval, evaluate_zero_shot
    from ..model.card import write_model_card
    from ..model.modeling import AlignerModel

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - {"zero_shot", "retrieval"})
    if unknown:
        raise ValueError(f"tasks must be among zero_shot, retrieval; got {unknown}")
    model = AlignerModel.from_pretrained(args.model)
    data = load_dataset_split(args.dataset, args.dataset_config, args.split, args.max_samples)
    results = {}
    if "zero_shot" in tasks:
        results["zero_shot"] = evaluate_zero_shot(
            model,
            model.processor,
            data,
            class_names=args.class_names.split(",") if args.class_names else None,
            templates=args.templates.split("|") if args.templates else None,
            image_column=args.image_column,
            label_column=args.label_column,
            batch_size=args.batch_size,
            dataset_name=args.dataset,
            dataset_split=args.split,
        )
    if "retrieval" in tasks:
        results["retrieval"] = evaluate_retrieval(
            model,
            model.processor,
            data,
            args.image_column,
            args.text_column,
            args.batch_size,
            dataset_name=args.dataset,
            dataset_split=args.split,
        )
    for result in results.values():
        model.model_card_data.add_evaluation(result)
    print(json.dumps(results, indent=2))
    if os.path.isdir(args.model):  # a local aligner: its card now carries these results
        write_model_card(model, args.model)
    if args.output_file:
        with open(args.output_file, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 0


COMMAND = CommandSpec("evaluate", __doc__.split(": ", 1)[1], (EvaluateArguments,), run)
