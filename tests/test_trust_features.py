"""The feature cache's trust boundary (issue #21): a cache folder, a Hub dataset repo or a streamed cache is read
from its own files only, damage is refused by name (and rebuilt where hf_align owns the folder), nothing a user named
is deleted, and two writers of one cache both end with the winner's."""

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile

import datasets
import numpy as np
import pytest
import torch
from datasets.arrow_writer import ArrowWriter
from hub_server import serving, use_hub
from huggingface_hub import CommitOperationAdd, HfApi
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

import hf_align
from hf_align import AlignerModel
from hf_align.features import (
    DATA_FILE,
    META_FILE,
    PARTIAL_SUFFIX,
    FeatureCacheError,
    column_array,
    extract_features,
    features_from_tensors,
    load_cache,
    open_feature_cache,
    store,
)

INSIDE, SECRET = 1.0, 666.0  # the value of every feature of the cache's own rows / of the file outside it


# ---------------------------------------------------------------------------------------------- hand-written caches
def rows(value: float, n: int = 3) -> datasets.Dataset:
    return features_from_tensors({0: torch.full((n, 2), value)}, {0: torch.full((n, 2), value)})


def write_arrow(path, data: datasets.Dataset) -> dict:
    """`data` as an Arrow stream file at `path` (what extract_features writes); its size and SHA-256."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    writer = ArrowWriter(path=str(path), features=data.features)
    writer.write_table(data.with_format("arrow")[:])
    writer.finalize()
    writer.close()
    with open(path, "rb") as handle:
        content = handle.read()
    return {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}


def write_meta(folder, meta: dict) -> None:
    with open(os.path.join(folder, META_FILE), "w", encoding="utf-8") as handle:
        json.dump(meta, handle)


def sharded_meta(shards: list[dict]) -> dict:
    return {
        "parts": {"format": 2},
        "layout": "sharded",
        "num_rows": sum(shard["num_rows"] for shard in shards),
        "complete": True,
        "shards": shards,
        "skipped": [],
    }


def shard_record(file: str, record: dict, num_rows: int = 3) -> dict:
    return {"file": file, "source_shard": 0, "num_rows": num_rows, "num_source_rows": num_rows, **record, "skipped": []}


@pytest.fixture
def secret(tmp_path) -> tuple[str, dict]:
    """An Arrow file of the loading user's own, outside every cache (its size and SHA-256 known to the attacker)."""
    path = str(tmp_path / "private" / "secret.arrow")
    return path, write_arrow(path, rows(SECRET))


def hostile_cache(tmp_path, secret, how: str, layout: str) -> str:
    """A cache folder whose metadata or files point at `secret`: a `../` entry, an absolute entry, or a symbolic
    link inside the folder (the data file itself, or the folder `data/` on the way)."""
    folder = tmp_path / f"{layout}-{how}"
    folder.mkdir()
    path, record = secret
    if layout == "single":
        os.symlink(path, folder / DATA_FILE)  # a single-file cache names no file: only a link can point out
        meta = {"parts": {"format": 2}, "num_rows": 3, "complete": True, "data_file": record, "skipped": []}
        write_meta(folder, meta)
        return str(folder)
    own = write_arrow(folder / "data" / "shard-00000.arrow", rows(INSIDE))
    entry = {
        "dotdot": os.path.relpath(path, folder),
        "absolute": path,
        "link": "data/shard-00001.arrow",
        "folder-link": "linked/secret.arrow",
    }[how]
    if how == "link":
        os.symlink(path, folder / "data" / "shard-00001.arrow")
    if how == "folder-link":
        os.symlink(os.path.dirname(path), folder / "linked")
    write_meta(folder, sharded_meta([shard_record("data/shard-00000.arrow", own), shard_record(entry, record)]))
    return str(folder)


# how hf_align.utils.safe_loading.resolve_inside says it: a `..` or absolute entry, or a link whose target is outside
OUTSIDE = r"(points outside|resolves to '[^']*secret[^']*', outside)"
HOSTILE = [("single", "link"), *[("sharded", how) for how in ("dotdot", "absolute", "link", "folder-link")]]


# ---------------------------------------------------------------------------------------------- §1 shard names
@pytest.mark.parametrize("layout,how", HOSTILE)
def test_cache_files_outside_the_folder_are_refused_by_every_loader(tmp_path, secret, layout, how):
    folder = hostile_cache(tmp_path, secret, how, layout)
    with open(os.path.join(folder, META_FILE), encoding="utf-8") as handle:
        meta = json.load(handle)
    entry = DATA_FILE if layout == "single" else meta["shards"][1]["file"]
    expected = f"feature cache file {re.escape(repr(entry))} {OUTSIDE} {re.escape(repr(folder))}" + (
        r"( \(a symlink\?\))?: an artefact may only name paths inside its own folder"
    )
    for load in (
        load_cache,
        open_feature_cache,
        hf_align.load_features,
        lambda path: list(hf_align.load_features(path, streaming=True)),
    ):
        with pytest.raises(FeatureCacheError, match=expected):
            load(folder)


# ---------------------------------------------------------------------------------------------- §1 dataset repos
@pytest.fixture
def stand_in_hub(monkeypatch, tmp_path):
    with serving(monkeypatch) as hub:
        use_hub(monkeypatch, cache=tmp_path / "hub_cache")
        yield hub


def push_repo(repo_id: str, files: dict[str, bytes]) -> None:
    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset")
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in files.items()]
    api.create_commit(repo_id, operations, repo_type="dataset", commit_message="hostile")


def card(path: str) -> bytes:
    return f"---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: {path}\n---\n".encode()


def saved_dataset(tmp_path, data: datasets.Dataset) -> dict[str, bytes]:
    """The files `save_to_disk` writes for `data`, by name."""
    data.save_to_disk(tmp_path / "saved")
    return {name: (tmp_path / "saved" / name).read_bytes() for name in os.listdir(tmp_path / "saved")}


@pytest.mark.slow
def test_a_dataset_repo_listing_files_of_the_loading_users_disk_is_refused(stand_in_hub, tmp_path, secret):
    """Reproduced on the code before the fix: each repo below made `load_features` return the secret rows."""
    private = tmp_path / "private"
    rows(SECRET).to_parquet(str(private / "secret.parquet"))
    rows(INSIDE).to_parquet(str(tmp_path / "own.parquet"))  # the repo's own data, beside the hostile entry
    parquet = (tmp_path / "own.parquet").read_bytes()
    escaping = "../" * 12 + str(private / "secret.parquet").lstrip("/")
    saved = saved_dataset(tmp_path, rows(INSIDE))
    state = json.loads(saved["state.json"])
    state["_data_files"] = [{"filename": secret[0]}]
    hostile = {
        "me/card-absolute": {"README.md": card(str(private / "secret.parquet")), "data/own.parquet": parquet},
        "me/card-escaping": {"README.md": card(escaping), "data/own.parquet": parquet},
        "me/state-absolute": {**saved, "state.json": json.dumps(state).encode()},
        "me/dict-split": {"dataset_dict.json": json.dumps({"splits": [str(tmp_path / "saved")]}).encode()},
    }
    expected = {
        "me/card-absolute": r"data file of the dataset card's configs '(\.\./)+.*private/secret.parquet' points outside",
        "me/card-escaping": r"data file of the dataset card's configs '(\.\./)+.*private/secret.parquet' points outside",
        "me/state-absolute": rf"state.json data file {re.escape(repr(secret[0]))} points outside '.*snapshots/[0-9a-f]+'",
        "me/dict-split": r"dataset_dict.json split folder '.*saved' points outside '.*snapshots/[0-9a-f]+'",
    }
    for repo_id, files in hostile.items():
        push_repo(repo_id, files)
        with pytest.raises(FeatureCacheError, match=expected[repo_id]):
            hf_align.load_features(repo_id)
    # the same repos' own files are read: the card pointing at them, and the save_to_disk folder as written
    push_repo("me/card-own", {"README.md": card("data/*.parquet"), "data/own.parquet": parquet})
    push_repo("me/state-own", saved)
    for repo_id in ("me/card-own", "me/state-own"):
        assert column_array(hf_align.load_features(repo_id), "vision_layer_0").tolist() == [[INSIDE] * 2] * 3


def cache_repo_files(tmp_path, entry: str, record: dict) -> dict[str, bytes]:
    """A sharded cache as pushed to a dataset repo: its own shard, and a second one named `entry` (size and SHA-256
    `record`)."""
    folder = tmp_path / "pushed"
    own = write_arrow(folder / "data" / "shard-00000.arrow", rows(INSIDE))
    meta = sharded_meta([shard_record("data/shard-00000.arrow", own), shard_record(entry, record)])
    return {
        "data/shard-00000.arrow": (folder / "data" / "shard-00000.arrow").read_bytes(),
        META_FILE: json.dumps(meta).encode(),
    }


@pytest.mark.slow
def test_a_cache_repo_naming_files_outside_itself_is_refused_downloaded_or_streamed(stand_in_hub, tmp_path, secret):
    path, record = secret
    for repo_id, entry in (("me/absolute", path), ("me/dotdot", "../" * 12 + path.lstrip("/"))):
        push_repo(repo_id, cache_repo_files(tmp_path, entry, record))
        where = r"points outside '.*datasets--me--(absolute|dotdot)/snapshots/[0-9a-f]{40}': an artefact may only"
        with pytest.raises(FeatureCacheError, match=rf"feature cache file {re.escape(repr(entry))} {where}"):
            hf_align.load_features(repo_id)
        with pytest.raises(FeatureCacheError, match=rf"feature cache file {re.escape(repr(entry))} {where}"):
            hf_align.load_features(repo_id, streaming=True)


# ---------------------------------------------------------------------------------------------- §1 streamed shards
def sharded_cache(tmp_path) -> str:
    """A sharded cache of two shards: rows of value 1 and rows of value 2."""
    folder = tmp_path / "sharded"
    records = [
        shard_record(f"data/shard-{i:05d}.arrow", write_arrow(folder / f"data/shard-{i:05d}.arrow", rows(i + 1)))
        for i in range(2)
    ]
    write_meta(folder, sharded_meta(records))
    return str(folder)


def damage(path, how: str) -> None:
    """Truncate the file, change one byte of its last record batch's values, or overwrite its header (same size)."""
    with open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        if how == "truncated":
            handle.truncate(size - 8)
            return
        if how == "header":  # the stream's first message: continuation marker and length
            handle.seek(0)
            handle.write(b"NOTARROW")
            return
        handle.seek(size - 24)  # a value of the last record batch, before the 8-byte end-of-stream marker
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x40]))


STREAM_ERRORS = {
    "truncated": r"feature cache file data/shard-00001.arrow is \d+ bytes, \d+ bytes were written \(truncated",
    "altered": r"feature cache file data/shard-00001.arrow read \d+ bytes with SHA-256 [0-9a-f]{64}, \d+ bytes with "
    r"[0-9a-f]{64} were written \(modified after extraction\)",
    "header": r"feature cache file data/shard-00001.arrow is not a readable Arrow file",
}


@pytest.mark.parametrize("how", list(STREAM_ERRORS))
def test_a_streamed_shard_is_checked_like_a_downloaded_one(tmp_path, how):
    folder = sharded_cache(tmp_path)
    stream = hf_align.load_features(folder, streaming=True)
    assert [row["vision_layer_0"] for row in stream] == [[1.0, 1.0]] * 3 + [[2.0, 2.0]] * 3  # intact: every row
    damage(os.path.join(folder, "data", "shard-00001.arrow"), how)
    read = []
    with pytest.raises(FeatureCacheError, match=STREAM_ERRORS[how]):
        for row in hf_align.load_features(folder, streaming=True):
            read.append(row["vision_layer_0"])
    assert read[:3] == [[1.0, 1.0]] * 3  # the intact shard before it was read; the damaged one is named
    if how == "truncated":
        assert len(read) == 3  # refused before a byte of it is read


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "altered"])
def test_a_shard_damaged_on_the_hub_is_named_when_streamed(stand_in_hub, tmp_path, how):
    folder = sharded_cache(tmp_path)
    files = {
        name: open(os.path.join(folder, *name.split("/")), "rb").read()
        for name in (META_FILE, "data/shard-00000.arrow", "data/shard-00001.arrow")
    }
    push_repo("me/damaged", files)
    stored = stand_in_hub.files("me/damaged", "dataset")
    damage(os.path.join(folder, "data", "shard-00001.arrow"), how)  # the same damage, done on the Hub's copy
    stored["data/shard-00001.arrow"] = open(os.path.join(folder, "data", "shard-00001.arrow"), "rb").read()
    with pytest.raises(FeatureCacheError, match=STREAM_ERRORS[how]):
        list(hf_align.load_features("me/damaged", streaming=True))


# ---------------------------------------------------------------------------------------------- §3 caches
@pytest.fixture(scope="module")
def model(tiny_vit, tiny_bert):
    return AlignerModel.from_encoders(tiny_vit, tiny_bert, projection_dim=8)


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(4)]
    return datasets.Dataset.from_dict(
        {"image": images, "caption": [f"picture number {i}" for i in range(4)]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )


def snapshot(folder) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes."""
    found = {}
    for where, _, names in os.walk(folder):
        for name in names:
            found[os.path.relpath(os.path.join(where, name), folder)] = open(os.path.join(where, name), "rb").read()
    return found


def test_a_finished_partial_at_a_named_cache_path_is_never_wiped(model, pictures, tmp_path):
    stream = pictures.to_iterable_dataset(num_shards=2)
    target = str(tmp_path / "named")
    extract_features(model, model.processor, stream, cache_path=target)
    os.rename(target, target + PARTIAL_SUFFIX)  # finished, then stopped before the rename
    before = snapshot(target + PARTIAL_SUFFIX)
    with pytest.raises(
        FeatureCacheError,
        match=r"named.partial' holds a finished extraction that cannot be used for this one \(feature cache '.*"
        r"named.partial' was built for other inputs: on_bad_sample: recorded \"raise\", now \"skip\"\. .*\); rerun "
        r"with the inputs it was made with, or delete it to start over",
    ):
        extract_features(model, model.processor, stream, cache_path=target, on_bad_sample="skip")
    assert snapshot(target + PARTIAL_SUFFIX) == {**before, "progress/lock": b""}  # only the lock file was added
    assert not os.path.exists(target)
    # with its own inputs it is finished: renamed, not re-extracted
    features = extract_features(model, model.processor, stream, cache_path=target)
    assert len(features) == 4 and not os.path.exists(target + PARTIAL_SUFFIX)


def test_two_writers_finishing_one_cache_both_end_with_the_winners(model, pictures, tmp_path, monkeypatch):
    """The loser checked that the cache did not exist, then the winner renamed its copy into place: the loser's
    rename must give way, not fail with `OSError: Directory not empty`."""
    rename = os.replace
    winners = []

    def winner_finishes_first(source, destination):
        if ".tmp-" in str(source) and not winners:
            winner = f"{destination}.tmp-other-host-1"
            shutil.copytree(source, winner)
            open(os.path.join(winner, "winner"), "w").close()
            winners.append(winner)
            rename(winner, destination)
        return rename(source, destination)

    monkeypatch.setattr(store.os, "replace", winner_finishes_first)
    features = extract_features(model, model.processor, pictures, cache_dir=tmp_path / "caches")
    monkeypatch.undo()
    (folder,) = os.listdir(tmp_path / "caches")  # no leftover temporary folder
    assert os.listdir(tmp_path / "caches" / folder).count("winner") == 1  # the winner's folder stands
    assert features.cache_files[0]["filename"] == str(tmp_path / "caches" / folder / DATA_FILE)
    again = extract_features(model, model.processor, pictures, cache_dir=tmp_path / "caches")
    assert again.to_dict() == features.to_dict()


MALFORMED = {  # a damage to the valid-JSON metadata -> the field the error names
    "top level is a list": (lambda meta: [meta], r"'\(top level\)' must be an object, got \[\{"),
    "complete missing": (lambda meta: {k: v for k, v in meta.items() if k != "complete"}, r"'complete' must be true"),
    "parts a string": (lambda meta: {**meta, "parts": "x"}, r"'parts' must be an object, got \"x\""),
    "num_rows a string": (lambda meta: {**meta, "num_rows": "4"}, r"'num_rows' must be an int >= 0, got \"4\""),
    "num_rows a bool": (lambda meta: {**meta, "num_rows": True}, r"'num_rows' must be an int >= 0, got true"),
    "skipped a dict": (lambda meta: {**meta, "skipped": {}}, r"'skipped' must be a list, got \{\}"),
    "size negative": (
        lambda meta: {**meta, "data_file": {**meta["data_file"], "size": -1}},
        r"'data_file.size' must be an int >= 0, got -1",
    ),
    "sha256 missing": (
        lambda meta: {**meta, "data_file": {"size": meta["data_file"]["size"]}},
        r"'data_file.sha256' must be 64 hexadecimal digits, got null",
    ),
}


def test_malformed_metadata_is_damage_named_by_field_and_rebuilt_under_cache_dir(model, pictures, tmp_path, caplog):
    extract_features(model, model.processor, pictures, cache_dir=tmp_path)
    (name,) = os.listdir(tmp_path)
    folder = str(tmp_path / name)
    with open(os.path.join(folder, META_FILE), encoding="utf-8") as handle:
        good = json.load(handle)
    named = str(tmp_path.parent / f"{tmp_path.name}-named")
    shutil.copytree(folder, named)
    for malform, field in MALFORMED.values():
        write_meta(folder, malform(good))
        message = rf"feature cache '{re.escape(folder)}' is damaged: hf_align_cache.json field {field}"
        with pytest.raises(FeatureCacheError, match=message):
            load_cache(folder)
        with pytest.raises(FeatureCacheError, match=message):
            hf_align.load_features(folder)
    # the shard records of a sharded cache, field by field
    sharded = sharded_cache(tmp_path.parent / f"{tmp_path.name}-sharded")
    with open(os.path.join(sharded, META_FILE), encoding="utf-8") as handle:
        meta = json.load(handle)
    for shard, problem in (
        ("x", r"'shards\[1\]' must be an object, got \"x\""),
        ({**meta["shards"][1], "file": 7}, r"'shards\[1\].file' must be a file path, got 7"),
        ({**meta["shards"][1], "num_rows": None}, r"'shards\[1\].num_rows' must be an int >= 0, got null"),
    ):
        write_meta(sharded, {**meta, "shards": [meta["shards"][0], shard]})
        with pytest.raises(FeatureCacheError, match=rf"is damaged: hf_align_cache.json field {problem}"):
            load_cache(sharded)
    # the parts a model check reads (load_features with a model, check_features, streamed or not)
    for parts, problem in (
        ({**good["parts"], "vision_encoder": "org/vit"}, r"'parts.vision_encoder' must be \[encoder id, revision, "),
        ({**good["parts"], "taps": {"vision": ["x"]}}, r"'parts.taps' must be \{modality: \{column: tap\}\}, got"),
    ):
        write_meta(folder, {**good, "parts": parts})
        for streaming in (False, True):
            with pytest.raises(FeatureCacheError, match=rf"is damaged: hf_align_cache.json field {problem}"):
                hf_align.load_features(folder, model, streaming=streaming)
    # extract_features rebuilds a damaged cache it owns, and leaves one the user named as it is
    write_meta(folder, MALFORMED["num_rows a string"][0](good))
    with caplog.at_level(logging.WARNING, logger="hf_align.features"):
        rebuilt = extract_features(model, model.processor, pictures, cache_dir=tmp_path)
    assert "rebuilding: feature cache" in caplog.text and "field 'num_rows' must be an int >= 0" in caplog.text
    assert len(rebuilt) == 4 and json.load(open(os.path.join(folder, META_FILE)))["num_rows"] == 4
    write_meta(named, MALFORMED["parts a string"][0](good))
    before = snapshot(named)
    with pytest.raises(FeatureCacheError, match=r"field 'parts' must be an object"):
        extract_features(model, model.processor, pictures, cache_path=named)
    assert snapshot(named) == before


def test_a_corrupt_arrow_header_in_a_large_cache_is_named_and_rebuilt(model, pictures, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(store, "CHECKSUM_AUTO_BYTES", 0)  # every cache is "large": its checksum is not read on load
    extract_features(model, model.processor, pictures, cache_dir=tmp_path)
    (name,) = os.listdir(tmp_path)
    data = tmp_path / name / DATA_FILE
    damage(data, "header")
    with pytest.raises(
        FeatureCacheError,
        match=rf"feature cache '.*{name}' is damaged: features.arrow is not a readable Arrow file \(.*\); delete",
    ):
        load_cache(str(tmp_path / name))
    with caplog.at_level(logging.WARNING, logger="hf_align.features"):
        rebuilt = extract_features(model, model.processor, pictures, cache_dir=tmp_path)
    assert "rebuilding: feature cache" in caplog.text and "features.arrow is not a readable Arrow file" in caplog.text
    assert len(rebuilt) == 4 and data.read_bytes()[:8] != b"NOTARROW"


# ---------------------------------------------------------------------------------------------- §6 properties
PROPERTIES = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TARGETS = ["own", "missing", "dotdot", "absolute", "link", "folder-link", "self", "meta"]
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 2**40), st.text(max_size=8), st.lists(st.integers(), max_size=2)
)


def record_of(target: str, files: dict) -> st.SearchStrategy:
    """A shard record naming `target` (one of TARGETS): true to the file it reaches (so that only the path check can
    stop a read outside), with up to two fields replaced by junk."""
    entry, truth = files[target]
    record = {"file": entry, **truth, "num_rows": 3, "skipped": []}
    junk = st.just({}) | st.dictionaries(st.sampled_from(sorted(record)), JUNK, min_size=1, max_size=2)
    return junk.map(lambda replaced: {**record, **replaced})


def hostile_layout(root: str) -> tuple[str, dict]:
    """A cache folder under `root` with its own shard, a secret Arrow file beside it, and links out of it; every
    way a record can name a file: target -> (entry, {size, sha256} of the file it reaches)."""
    folder, private = os.path.join(root, "cache"), os.path.join(root, "private")
    own = write_arrow(os.path.join(folder, "data", "shard-00000.arrow"), rows(INSIDE))
    secret = write_arrow(os.path.join(private, "secret.arrow"), rows(SECRET))
    os.symlink(os.path.join(private, "secret.arrow"), os.path.join(folder, "data", "link.arrow"))
    os.symlink(private, os.path.join(folder, "linked"))
    return folder, {
        "own": ("data/shard-00000.arrow", own),
        "missing": ("data/shard-00009.arrow", own),
        "dotdot": ("../private/secret.arrow", secret),
        "absolute": (os.path.join(private, "secret.arrow"), secret),
        "link": ("data/link.arrow", secret),
        "folder-link": ("linked/secret.arrow", secret),
        "self": (".", own),
        "meta": (META_FILE, own),
    }


def loaded_values(dataset) -> set[float]:
    if isinstance(dataset, datasets.IterableDataset):
        return {value for row in dataset for value in row["vision_layer_0"]}
    return set(column_array(dataset, "vision_layer_0").ravel().tolist())


LOADERS = {
    "load_cache": load_cache,
    "open_feature_cache": open_feature_cache,
    "load_features": hf_align.load_features,
    "load_features streaming": lambda folder: hf_align.load_features(folder, streaming=True),
}


@PROPERTIES
@given(
    data=st.data(),
    layout=st.sampled_from(["single", "sharded"]),
    top=st.just({}) | st.dictionaries(st.sampled_from(["complete", "parts", "num_rows", "skipped", "layout"]), JUNK),
)
def test_hostile_metadata_loads_the_caches_own_rows_or_raises_feature_cache_error(data, layout, top):
    with tempfile.TemporaryDirectory() as root:
        folder, files = hostile_layout(root)
        if layout == "single":
            target = data.draw(st.sampled_from(["own", "link"]), label="data file")
            if target == "link":  # a single-file cache names no file: its features.arrow is the link
                os.remove(os.path.join(folder, "data", "shard-00000.arrow"))
                os.symlink(os.path.join(root, "private", "secret.arrow"), os.path.join(folder, DATA_FILE))
            else:
                shutil.copy(os.path.join(folder, "data", "shard-00000.arrow"), os.path.join(folder, DATA_FILE))
            record = data.draw(record_of(target, files), label="record")
            meta = {"parts": {}, "num_rows": 3, "complete": True, "skipped": [], "data_file": record}
        else:
            own = st.lists(st.just("own"), min_size=1, max_size=2)
            targets = data.draw(own | st.lists(st.sampled_from(TARGETS), min_size=1, max_size=3), label="shards")
            shards = [data.draw(record_of(target, files), label=target) for target in targets]
            meta = {**sharded_meta([{"num_rows": 3}] * len(shards)), "parts": {}, "shards": shards}
            meta["num_rows"] = data.draw(st.just(3 * len(shards)) | JUNK, label="num_rows")
        meta.update(top)
        write_meta(folder, meta)
        before = snapshot(root)
        for name, load in LOADERS.items():
            try:
                values = loaded_values(load(folder))
            except FeatureCacheError:
                event(f"{name}: refused")
                continue
            event(f"{name}: loaded")
            assert values == {INSIDE}, f"{name} read rows from outside the cache: {values}"
        assert snapshot(root) == before  # nothing deleted or changed, inside or outside


@PROPERTIES
@given(data=st.data(), top=st.dictionaries(st.sampled_from(["complete", "parts", "num_rows"]), JUNK, max_size=1))
def test_extract_features_never_deletes_a_named_hostile_cache(model, pictures, data, top):
    with tempfile.TemporaryDirectory() as root:
        folder, files = hostile_layout(root)
        targets = data.draw(st.lists(st.sampled_from(TARGETS), min_size=1, max_size=2), label="shards")
        shards = [data.draw(record_of(target, files), label=target) for target in targets]
        write_meta(folder, {**sharded_meta([{"num_rows": 3}] * len(shards)), "shards": shards, **top})
        before = snapshot(root)
        with pytest.raises(FeatureCacheError, match=re.escape(repr(folder))):
            extract_features(model, model.processor, pictures, cache_path=folder)
        assert snapshot(root) == before
