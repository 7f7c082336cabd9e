"""`hf-align extract`: run the frozen encoders once over a dataset and cache their features."""

from __future__ import annotations

from dataclasses import dataclass, field

from .arguments import DataArguments, ModelArguments
from .base import CommandSpec


@dataclass
class StreamingArguments:
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the dataset (load_dataset(..., streaming=True)) and extract it source shard by source "
            "shard into a sharded cache that a rerun resumes after a kill."
        },
    )


def run(model_args: ModelArguments, data_args: DataArguments, streaming_args: StreamingArguments) -> int:
    model = model_args.build()
    if streaming_args.streaming:
        import datasets

        if data_args.max_samples is not None:
            raise ValueError(
                f"max_samples={data_args.max_samples} does not apply with --streaming: a stream is extracted whole, "
                "shard by shard (give a dataset of the rows to extract, or drop --streaming)"
            )
        data = datasets.load_dataset(data_args.dataset, data_args.dataset_config, split=data_args.split, streaming=True)
    else:
        data = data_args.load()
    features = data_args.extract(model, data)
    print(f"{len(features)} rows, columns {features.column_names}")
    print(f"cache: {features.cache_files[0]['filename']}")
    return 0


COMMAND = CommandSpec("extract", __doc__.split(": ", 1)[1], (ModelArguments, DataArguments, StreamingArguments), run)
