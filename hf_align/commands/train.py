"""`hf-align train`: extract (or reuse) the feature cache, train an aligner on it and save it.

Unset training arguments take `hf_align.train`'s defaults, which fit the batch and the run to the data
(`hf_align.training.arguments.plan_training`); the run's summary (steps, best step and score, early stopping) is
printed.
"""

from __future__ import annotations

import json

from ..training.loop import AlignmentArguments
from .arguments import DataArguments, ModelArguments
from .base import CommandSpec


def run(model_args: ModelArguments, data_args: DataArguments, training_args: AlignmentArguments) -> int:
    from ..training.loop import train

    if training_args.output_dir is None:
        raise ValueError("hf-align train needs --output_dir (where the trained aligner is saved)")
    model = model_args.build()
    data = data_args.load()
    model.model_card_data.add_training_dataset(data, name=data_args.dataset, split=data_args.split)
    features = data_args.extract(model, data)
    result = train(model, features, training_args)
    summary = {
        "global_step": result.global_step,
        "total_steps": result.total_steps,
        "best_step": result.best_step,
        "best_metric": result.best_metric,
        "early_stopped": result.early_stopped,
        "train_runtime_s": result.train_runtime,
    }
    print(json.dumps({**summary, **result.metrics}, indent=2))
    print(f"aligner saved to {training_args.output_dir}")
    return 0


COMMAND = CommandSpec(
    "train", __doc__.split("\n")[0].split(": ", 1)[1], (ModelArguments, DataArguments, AlignmentArguments), run
)
