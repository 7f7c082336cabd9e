"""`hf-align train`: extract (or reuse) the feature cache, train an aligner on it and save it."""

from __future__ import annotations

import json

from ..arguments import DataArguments, ModelArguments
from ..training import AlignmentArguments
from .base import CommandSpec


def run(model_args: ModelArguments, data_args: DataArguments, training_args: AlignmentArguments) -> int:
    from ..training import train

    if training_args.output_dir is None:
        raise ValueError("hf-align train needs --output_dir (where the trained aligner is saved)")
    model = model_args.build()
    data = data_args.load()
    model.model_card_data.add_training_dataset(data, name=data_args.dataset, split=data_args.split)
    features = data_args.extract(model, data)
    result = train(model, features, training_args)
    print(
        json.dumps(
            {"global_step": result.global_step, "train_runtime_s": result.train_runtime, **result.metrics}, indent=2
        )
    )
    print(f"aligner saved to {training_args.output_dir}")
    return 0


COMMAND = CommandSpec("train", __doc__.split(": ", 1)[1], (ModelArguments, DataArguments, AlignmentArguments), run)
