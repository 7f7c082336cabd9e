"""`hf-align extract`: run the frozen encoders once over a dataset and cache their features."""

from __future__ import annotations

from ..arguments import DataArguments, ModelArguments, parse_layer_list
from . import CommandSpec


def run(model_args: ModelArguments, data_args: DataArguments) -> int:
    from ..features import extract_features

    model = model_args.build()
    features = extract_features(
        model,
        model.processor,
        data_args.load(),
        image_column=data_args.image_column,
        text_column=data_args.text_column,
        vision_layers=parse_layer_list("vision_layers", data_args.vision_layers),
        text_layers=parse_layer_list("text_layers", data_args.text_layers),
        batch_size=data_args.extraction_batch_size,
        cache_dir=data_args.cache_dir,
    )
    print(f"{len(features)} rows, columns {features.column_names}")
    print(f"cache: {features.cache_files[0]['filename']}")
    return 0


COMMAND = CommandSpec("extract", __doc__.split(": ", 1)[1], (ModelArguments, DataArguments), run)
