"""Feature cache integrity: recorded size and SHA-256, damaged or foreign caches refused by name, half-written caches
never read."""

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_align import AlignerModel
from hf_align.features import DATA_FILE, META_FILE, FeatureCacheError, extract_features, load_cache, open_feature_cache


@pytest.fixture(scope="module")
def model(tiny_vit, tiny_bert):
    return AlignerModel.from_encoders(tiny_vit, tiny_bert, projection_dim=8)


@pytest.fixture(scope="module")
def dataset():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(6)]
    return datasets.Dataset.from_dict(
        {"image": images, "caption": [f"picture number {i}" for i in range(6)]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )


def only_cache(root) -> str:
    (name,) = [n for n in os.listdir(root) if ".tmp-" not in n]
    return os.path.join(root, name)


def read_meta(folder) -> dict:
    with open(os.path.join(folder, META_FILE)) as handle:
        return json.load(handle)


def test_metadata_records_size_and_sha256_of_the_arrow_file(model, dataset, tmp_path):
    features = extract_features(model, model.processor, dataset, cache_dir=tmp_path)
    folder = only_cache(tmp_path)
    meta = read_meta(folder)
    with open(os.path.join(folder, DATA_FILE), "rb") as handle:
        data = handle.read()
    assert meta["data_file"] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert meta["num_rows"] == len(features) == 6
    assert meta["skipped"] == [] and meta["parts"]["on_bad_sample"] == "raise"
    assert meta["parts"]["layers"] == {"vision": [2], "text": [2]}
    assert features.cache_files[0]["filename"] == os.path.join(folder, DATA_FILE)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # written under a temporary name, then renamed


def test_truncated_arrow_file_is_refused_then_rebuilt_under_cache_dir(model, dataset, tmp_path, caplog):
    first = extract_features(model, model.processor, dataset, cache_dir=tmp_path)
    expected = torch.tensor(first["vision_layer_2"])
    folder = only_cache(tmp_path)
    data_path = os.path.join(folder, DATA_FILE)
    size = os.path.getsize(data_path)
    with open(data_path, "r+b") as handle:
        handle.truncate(size - 100)
    with pytest.raises(
        FeatureCacheError,
        match=rf"is damaged: features.arrow is {size - 100} bytes, {size} bytes were written \(truncated",
    ):
        load_cache(folder)
    with caplog.at_level(logging.WARNING, logger="hf_align.features"):
        rebuilt = extract_features(model, model.processor, dataset, cache_dir=tmp_path)
    assert "rebuilding: feature cache" in caplog.text and "is damaged" in caplog.text
    assert os.path.getsize(data_path) == size
    torch.testing.assert_close(torch.tensor(rebuilt["vision_layer_2"]), expected, rtol=0, atol=0)


def test_same_size_modification_is_caught_by_the_checksum(model, dataset, tmp_path):
    extract_features(model, model.processor, dataset, cache_dir=tmp_path)
    folder = only_cache(tmp_path)
    data_path = os.path.join(folder, DATA_FILE)
    with open(data_path, "r+b") as handle:
        handle.seek(os.path.getsize(data_path) - 200)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(
        FeatureCacheError, match=r"is damaged: features.arrow has SHA-256 [0-9a-f]{64}, [0-9a-f]{64} was written"
    ):
        load_cache(folder)  # small file: the checksum is verified by default
    assert len(load_cache(folder, verify_checksum=False)) == 6  # size-only check: the caller opted out
    with pytest.raises(FeatureCacheError, match="SHA-256"):
        extract_features(model, model.processor, dataset, cache_path=folder)  # a named folder is never rebuilt


def test_cache_built_for_other_inputs_names_each_differing_part(model, dataset, tmp_path, tiny_vit, tiny_bert):
    folder = str(tmp_path / "my_cache")
    extract_features(model, model.processor, dataset, cache_path=folder)
    assert len(extract_features(model, model.processor, dataset, cache_path=folder)) == 6  # same inputs: reused

    with pytest.raises(FeatureCacheError, match=r"built for other inputs: layers.vision: recorded \[2\], now \[1\]"):
        extract_features(model, model.processor, dataset, cache_path=folder, vision_layers=[1])

    # The same encoders through another tap: the column the aligner reads differs, so the cache does too.
    other_pooling = AlignerModel.from_encoders(tiny_vit, tiny_bert, projection_dim=8, vision_pooling="mean")
    with pytest.raises(
        FeatureCacheError,
        match=r'taps.vision.vision_last_hidden_state: recorded "last_hidden_state · cls, 1 prefix token", '
        r'now "last_hidden_state · mean, 1 prefix token"',
    ):
        extract_features(other_pooling, other_pooling.processor, dataset, cache_path=folder)
    legacy_tap = AlignerModel.from_encoders(tiny_vit, tiny_bert, projection_dim=8, vision_source="hidden_states")
    with pytest.raises(
        FeatureCacheError,
        match=r'taps.vision.vision_last_hidden_state: recorded "last_hidden_state · cls, 1 prefix '
        r'token", now null',
    ):
        extract_features(legacy_tap, legacy_tap.processor, dataset, cache_path=folder)

    other_data = dataset.select([0, 1, 2])
    with pytest.raises(
        FeatureCacheError, match=rf'dataset: recorded "{dataset._fingerprint}", now "{other_data._fingerprint}"'
    ):
        extract_features(model, model.processor, other_data, cache_path=folder)

    revision = model.config.vision_revision
    model.config.vision_revision = "0123abcd"
    try:
        with pytest.raises(
            FeatureCacheError, match=r'vision_encoder: recorded \[".*", null, .*\], now \[".*", "0123abcd"'
        ):
            extract_features(model, model.processor, dataset, cache_path=folder)
    finally:
        model.config.vision_revision = revision

    with pytest.raises(
        FeatureCacheError,
        match=r"layers.text: recorded \[2\], now \[0, 1, 2\]; on_bad_sample: recorded \"raise\", now \"skip\"",
    ):
        extract_features(model, model.processor, dataset, cache_path=folder, text_layers="all", on_bad_sample="skip")


def test_cache_path_that_is_not_a_cache_is_refused_and_left_alone(model, dataset, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(
        FeatureCacheError,
        match=r"cache_path=.*photos' exists but is not a finished hf_align feature cache \(no hf_align_cache.json\)",
    ):
        extract_features(model, model.processor, dataset, cache_path=folder)
    assert (folder / "holiday.jpg").read_bytes() == b"precious"


def test_half_written_caches_are_never_read(model, dataset, tmp_path, caplog):
    extract_features(model, model.processor, dataset, cache_dir=tmp_path)
    folder = only_cache(tmp_path)
    name = os.path.basename(folder)
    # an extraction on this host that was killed mid-write (its pid no longer runs) ...
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{name}.tmp-{socket.gethostname()}-{dead.pid}"
    stale.mkdir()
    (stale / DATA_FILE).write_bytes(b"half")
    # ... one still running elsewhere (another host) ...
    foreign = tmp_path / f"{name}.tmp-some-other-host-{dead.pid}"
    foreign.mkdir()
    # ... and a cache folder whose metadata never got written (a copy interrupted half way)
    os.remove(os.path.join(folder, META_FILE))
    assert load_cache(folder) is None  # no metadata: not a cache, never opened
    with caplog.at_level(logging.WARNING, logger="hf_align.features"):
        features = extract_features(model, model.processor, dataset, cache_dir=tmp_path)
    assert f"removing {stale}: left unfinished by a stopped extraction" in caplog.text
    assert "an unfinished feature cache (no hf_align_cache.json)" in caplog.text
    assert not stale.exists() and foreign.exists()
    assert len(features) == 6 and read_meta(folder)["num_rows"] == 6


def test_unreadable_or_old_metadata_is_refused(model, dataset, tmp_path):
    extract_features(model, model.processor, dataset, cache_dir=tmp_path)
    folder = only_cache(tmp_path)
    meta = read_meta(folder)
    del meta["data_file"]
    with open(os.path.join(folder, META_FILE), "w") as handle:
        json.dump(meta, handle)
    with pytest.raises(FeatureCacheError, match=r"has no size/checksum record \(written by an older hf_align\)"):
        load_cache(folder)
    with open(os.path.join(folder, META_FILE), "w") as handle:
        handle.write('{"parts": {')
    with pytest.raises(FeatureCacheError, match=r"hf_align_cache.json is unreadable"):
        load_cache(folder)


def test_open_feature_cache_reads_a_cache_or_a_saved_dataset_and_names_what_it_cannot(model, dataset, tmp_path):
    features = extract_features(model, model.processor, dataset, cache_dir=tmp_path / "caches")
    folder = only_cache(tmp_path / "caches")
    opened = open_feature_cache(folder)
    assert opened.cache_files[0]["filename"] == os.path.join(folder, DATA_FILE)
    assert opened.to_dict() == features.to_dict()
    # save_to_disk folders: a Dataset, and a DatasetDict's `split`; other local folders go to datasets.load_dataset
    plain = datasets.Dataset.from_dict({"vision_layer_0": [[1.0, 2.0], [3.0, 4.0]], "image_id": [0, 1]})
    plain.save_to_disk(tmp_path / "plain")
    assert open_feature_cache(tmp_path / "plain").to_dict() == plain.to_dict()
    datasets.DatasetDict({"train": plain, "test": plain.select([1])}).save_to_disk(tmp_path / "dict")
    assert open_feature_cache(tmp_path / "dict", split="test").to_dict() == {
        "vision_layer_0": [[3.0, 4.0]],
        "image_id": [1],
    }
    os.makedirs(tmp_path / "parquet")
    plain.to_parquet(tmp_path / "parquet" / "train.parquet")
    assert open_feature_cache(tmp_path / "parquet").to_dict() == plain.to_dict()
    # a damaged cache is refused, never read as some other kind of folder
    with open(os.path.join(folder, DATA_FILE), "ab") as handle:
        handle.write(b"x")
    with pytest.raises(FeatureCacheError, match=r"is damaged: features.arrow is \d+ bytes"):
        open_feature_cache(folder)
    with pytest.raises(FileNotFoundError, match=r"feature cache folder '.*missing' does not exist"):
        open_feature_cache(tmp_path / "missing")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(
        ValueError, match=r"'.*empty' holds neither an hf_align feature cache nor a save_to_disk dataset"
    ):
        open_feature_cache(tmp_path / "empty")
