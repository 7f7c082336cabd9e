"""Layer selection and the data-efficiency experiment on a sharded cache (a Dataset over several memory-mapped Arrow
files): the same results as on one file holding the same rows, and the feature columns are read for the sampled
rows only."""

import datasets
import datasets.arrow_dataset
import numpy as np
import pytest
import torch

import hf_align
from hf_align.experiments.data_efficiency import Variant, run_data_efficiency
from hf_align.features import features_from_tensors
from hf_align.testing import make_paired_task

FAST = hf_align.AlignmentArguments(
    max_steps=10, per_device_train_batch_size=64, learning_rate=1e-2, eval_fraction=0.0, mixed_precision="no"
)
N_ROWS = 1200


def on_disk(features: datasets.Dataset, folder, num_shards: int) -> datasets.Dataset:
    features.save_to_disk(str(folder), num_shards=num_shards)
    loaded = datasets.load_from_disk(str(folder))
    assert len(loaded.cache_files) == num_shards
    return loaded


@pytest.fixture(scope="module")
def two_captions(tmp_path_factory):
    """Layers 0..2 / 0..1 of a planted task, two caption rows per image (`image_id` = row // 2), a `row` column, as
    one Arrow file and as 4 shards."""
    task = make_paired_task(n=N_ROWS, n_vision_layers=3, n_text_layers=2, shared_layers=(1, 0), seed=0)
    features = features_from_tensors(
        task.vision, task.text, image_id=torch.arange(N_ROWS) // 2, extra_columns={"row": np.arange(N_ROWS)}
    )
    root = tmp_path_factory.mktemp("two_captions")
    return on_disk(features, root / "single", 1), on_disk(features, root / "sharded", 4)


@pytest.fixture(scope="module")
def one_caption(tmp_path_factory):
    """Layers 0..1 of a planted task, one row per image (`image_id` = row), as one Arrow file and as 4 shards."""
    features = make_paired_task(n=N_ROWS, n_vision_layers=2, n_text_layers=2, shared_layers=(0, 0), seed=1)
    root = tmp_path_factory.mktemp("one_caption")
    cache = features.to_features(with_labels=False)
    return on_disk(cache, root / "single", 1), on_disk(cache, root / "sharded", 4)


@pytest.fixture
def feature_rows_read(monkeypatch):
    """The rows whose feature columns (`vision_*` / `text_*`) were turned into Python / NumPy / torch values: every
    `Dataset.__getitem__` formats its rows with `format_table`; this records the `row` (else `image_id`) values of
    the rows of each call that formats a feature column."""
    rows: list[int] = []
    original = datasets.arrow_dataset.format_table

    def recording(table, key, formatter, format_columns=None, output_all_columns=False):
        formatted = format_columns if format_columns is not None else table.column_names
        if any(name.startswith(("vision_", "text_")) for name in formatted):
            identity = "row" if "row" in table.column_names else "image_id"
            rows.extend(table.column(identity).to_pylist())
        return original(table, key, formatter, format_columns=format_columns, output_all_columns=output_all_columns)

    monkeypatch.setattr(datasets.arrow_dataset, "format_table", recording)
    return rows


@pytest.mark.parametrize("metric", ["mutual_knn", "cka"])
def test_layer_selection_on_shards_equals_one_file(two_captions, metric):
    single, sharded = two_captions
    one = hf_align.select_layers(single, metric=metric, n_samples=300, seed=3)
    many = hf_align.select_layers(sharded, metric=metric, n_samples=300, seed=3)
    assert many.to_dict() == one.to_dict()
    assert many.best_pair == (1, 0) and many.n_samples == 300


def test_layer_selection_reads_features_of_the_sampled_rows_only(two_captions, feature_rows_read):
    _, sharded = two_captions
    report = hf_align.select_layers(sharded, n_samples=100, seed=0)
    assert report.n_samples == 100
    # 100 rows of 100 different images, each read once for all the layer columns together
    assert len(feature_rows_read) == 100 and len(set(feature_rows_read)) == 100
    assert len({row // 2 for row in feature_rows_read}) == 100  # one caption per image
    assert len(feature_rows_read) < N_ROWS / 10  # reading everything would have formatted 1200 rows


def test_data_efficiency_on_shards_equals_one_file(one_caption):
    single, sharded = one_caption
    variants = [
        Variant("linear / last", "linear", {"projection_dim": 16}, "last"),
        Variant("linear / selected", "linear", {"projection_dim": 16}, "selected"),
    ]
    kwargs = {
        "sizes": (200,),
        "seeds": (0,),
        "variants": variants,
        "n_test": 100,
        "training_args": FAST,
        "selection_kwargs": {"n_samples": 150},
    }
    one, many = run_data_efficiency(single, **kwargs), run_data_efficiency(sharded, **kwargs)
    assert len(many.runs) == 2
    for a, b in zip(one.runs, many.runs, strict=True):
        assert (a["variant"], a["n"], a["n_rows"], a["layers"]) == (b["variant"], b["n"], b["n_rows"], b["layers"])
        assert a["metrics"] == b["metrics"]
    assert many.runs[1]["layers"] == [0, 0]  # selection on the training images finds the planted pair
    assert many.settings == one.settings


def test_data_efficiency_reads_features_of_the_training_and_test_images_only(one_caption, feature_rows_read):
    _, sharded = one_caption
    result = run_data_efficiency(
        sharded,
        sizes=(150,),
        seeds=(0,),
        variants=[Variant("linear / last", "linear", {"projection_dim": 16}, "last")],
        n_test=100,
        training_args=FAST,
    )
    read = set(feature_rows_read)
    # the 150 training images and the 100 held-out ones (one row each), plus row 0, whose widths are read
    assert result.runs[0]["n_rows"] == 150
    assert len(read - {0}) <= 250 and len(read) < N_ROWS / 4
