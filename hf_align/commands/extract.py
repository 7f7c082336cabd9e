"""`hf-align extract`: run the frozen encoders once over a dataset and cache their features."""

from __future__ import annotations

from ..arguments import DataArguments, ModelArguments
from .base import CommandSpec


def run(model_args: ModelArguments, data_args: DataArguments) -> int:
    model = model_args.build()
    features = data_args.extract(model, data_args.load())
    print(f"{len(features)} rows, columns {features.column_names}")
    print(f"cache: {features.cache_files[0]['filename']}")
    return 0


COMMAND = CommandSpec("extract", __doc__.split(": ", 1)[1], (ModelArguments, DataArguments), run)
