"""Sharing feature caches on the Hub: push / load round trips of both cache layouts against the stand-in Hub
(tests/hub_server.py), the dataset card, streaming, the CLI, the model check and its messages, refused folders."""

import copy
import hashlib
import json
import os
import shutil

import datasets
import numpy as np
import pytest
import torch
from datasets.arrow_writer import ArrowWriter
from hub_server import serving, use_hub
from huggingface_hub import DatasetCard
from PIL import Image

import hf_align
from hf_align import AlignerModel
from hf_align.commands.cli import main as cli_main
from hf_align.features import (
    DATA_FILE,
    META_FILE,
    FeatureCacheError,
    column_array,
    extract_features,
    features_from_tensors,
)

N_IMAGES, SHARDS = 6, 3


@pytest.fixture
def stand_in_hub(monkeypatch, tmp_path):
    with serving(monkeypatch) as hub:
        use_hub(monkeypatch, cache=tmp_path / "hub_cache")  # every test downloads into an empty cache
        yield hub


@pytest.fixture(scope="module")
def model(tiny_vit, tiny_bert):
    return AlignerModel.from_encoders(tiny_vit, tiny_bert, projection_dim=8)


@pytest.fixture(scope="module")
def single_cache(model, tmp_path_factory) -> str:
    """A real single-file cache: 6 images, 2 captions each, every hidden layer pooled plus the model's columns; the
    empty first caption of image 3 is skipped."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(N_IMAGES)]
    captions = [["" if i == 3 else f"picture {i}", f"a photo of thing {i}"] for i in range(N_IMAGES)]
    source = datasets.Dataset.from_dict(
        {"image": images, "caption": captions},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.List(datasets.Value("string"))}),
    )
    folder = str(tmp_path_factory.mktemp("caches") / "single")
    extract_features(
        model,
        model.processor,
        source,
        vision_layers="all",
        text_layers="all",
        cache_path=folder,
        on_bad_sample="skip",
    )
    return folder


def write_sharded_cache(single: str, folder: str, num_shards: int) -> str:
    """The sharded layout of the spec (`data/shard-XXXXX.arrow` + metadata listing each shard's rows, size and
    SHA-256, written last) holding the rows of the single-file cache `single`, split in `num_shards` runs."""
    with open(os.path.join(single, META_FILE), encoding="utf-8") as handle:
        meta = json.load(handle)
    rows = datasets.Dataset.from_file(os.path.join(single, DATA_FILE))
    os.makedirs(os.path.join(folder, "data"))
    shards = []
    for index, part in enumerate(np.array_split(np.arange(len(rows)), num_shards)):
        name = f"data/shard-{index:05d}.arrow"
        writer = ArrowWriter(path=os.path.join(folder, name), features=rows.features)
        writer.write_table(rows.select(part.tolist()).with_format("arrow")[:])
        writer.finalize()
        writer.close()
        with open(os.path.join(folder, name), "rb") as handle:
            data = handle.read()
        record = {"file": name, "source_shard": index, "num_rows": len(part), "num_source_rows": len(part)}
        shards.append({**record, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "skipped": []})
    sharded = {
        "parts": meta["parts"],
        "layout": "sharded",
        "num_rows": len(rows),
        "complete": True,
        "shards": shards,
        "skipped": meta["skipped"],
        "hf_align_version": hf_align.__version__,
    }
    with open(os.path.join(folder, META_FILE), "w", encoding="utf-8") as handle:
        json.dump(sharded, handle)
    return folder


@pytest.fixture(scope="module")
def sharded_cache(single_cache, tmp_path_factory) -> str:
    return write_sharded_cache(single_cache, str(tmp_path_factory.mktemp("caches") / "sharded"), SHARDS)


@pytest.fixture(params=["single", "sharded"])
def cache(request, single_cache, sharded_cache) -> str:
    return single_cache if request.param == "single" else sharded_cache


def assert_same_rows(loaded, original):
    """Every column of `loaded` (a Dataset, or the rows of an IterableDataset) equals the cache `original` (a Dataset
    or its folder), tensor by tensor."""
    if not isinstance(original, datasets.Dataset):
        original = hf_align.features.open_feature_cache(original)
    if isinstance(loaded, datasets.IterableDataset):
        loaded = datasets.Dataset.from_list(list(loaded), features=original.features)
    assert loaded.column_names == original.column_names and len(loaded) == len(original)
    for name in original.column_names:
        torch.testing.assert_close(
            torch.from_numpy(column_array(loaded, name)), torch.from_numpy(column_array(original, name)), rtol=0, atol=0
        )


def data_files(folder) -> list[str]:
    return (
        [DATA_FILE]
        if os.path.isfile(os.path.join(folder, DATA_FILE))
        else [f"data/shard-{i:05d}.arrow" for i in range(SHARDS)]
    )


# ---------------------------------------------------------------------------------------------- round trips
def test_push_then_load_gives_the_cache_back_tensor_by_tensor(stand_in_hub, cache, model):
    info = hf_align.push_features(cache, "me/feats", token="hf_standin", source_dataset="org/pics")
    assert info.commit_url.startswith(f"{stand_in_hub.url}/datasets/me/feats/commit/")
    files = stand_in_hub.files("me/feats", "dataset")
    assert set(files) == {META_FILE, "README.md", *data_files(cache)}
    for path in data_files(cache) + [META_FILE]:  # uploaded byte for byte
        with open(os.path.join(cache, path), "rb") as handle:
            assert files[path] == handle.read()
    posts = [(path, auth) for method, path, auth in stand_in_hub.requests if method == "POST"]
    assert [path for path, _ in posts][-2:] == [
        "/api/datasets/me/feats/preupload/main",
        "/api/datasets/me/feats/commit/main",
    ]
    assert {auth for _, auth in posts} == {"Bearer hf_standin"}

    loaded = hf_align.load_features("me/feats", model)  # downloaded, checked, and it fits the model it came from
    assert len(loaded) == 2 * N_IMAGES - 1  # one empty caption skipped
    assert_same_rows(loaded, cache)
    assert [os.path.basename(f["filename"]) for f in loaded.cache_files] == [
        p.split("/")[-1] for p in data_files(cache)
    ]
    # `datasets` alone reads the repo through the card's `configs`, in the same row order
    assert_same_rows(datasets.load_dataset("me/feats", split="train"), cache)


def test_streaming_reads_the_arrow_files_in_ranges_without_downloading_them(
    stand_in_hub, sharded_cache, model, tmp_path
):
    hf_align.push_features(sharded_cache, "me/streamed")
    stand_in_hub.requests.clear()
    stream = hf_align.load_features("me/streamed", model, streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    assert list(stream.features) == hf_align.features.open_feature_cache(sharded_cache).column_names
    first = next(iter(stream))
    reads = [
        path.rsplit("/", 1)[-1] for method, path, _ in stand_in_hub.requests if "/resolve/" in path and method == "GET"
    ]
    # the metadata is downloaded; of the data only the first shard has been read, every read a range request
    assert META_FILE in reads and "shard-00001.arrow" not in reads and "shard-00002.arrow" not in reads
    assert len([name for name in reads if name.endswith(".arrow")]) == len(stand_in_hub.ranges) > 0
    snapshots = tmp_path / "hub_cache" / "datasets--me--streamed" / "snapshots"
    assert [name for _, _, names in os.walk(snapshots) for name in names] == [META_FILE]  # nothing else downloaded
    torch.testing.assert_close(
        torch.tensor(first["vision_layer_1"]),
        torch.from_numpy(column_array(hf_align.features.open_feature_cache(sharded_cache), "vision_layer_1")[0]),
        rtol=0,
        atol=0,
    )
    assert_same_rows(stream, sharded_cache)  # every shard, in order


def test_load_features_streams_a_local_folder_and_opens_one(cache, model):
    assert_same_rows(hf_align.load_features(cache, model), cache)
    assert_same_rows(hf_align.load_features(cache, model, streaming=True), cache)


# ---------------------------------------------------------------------------------------------- the dataset card
def test_dataset_card_says_what_the_cache_holds_and_how_it_was_made(stand_in_hub, sharded_cache, tiny_vit, tiny_bert):
    hf_align.push_features(sharded_cache, "me/carded", source_dataset="org/pics", source_license="cc-by-4.0")
    card = DatasetCard(stand_in_hub.files("me/carded", "dataset")["README.md"].decode())
    assert card.data.license == "cc-by-4.0" and card.data.source_datasets == ["org/pics"]
    assert {"hf-align", "feature-extraction"} <= set(card.data.tags) and card.data.size_categories == ["n<1K"]
    assert card.data.configs == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.arrow"}]}]
    meta = json.loads(stand_in_hub.files("me/carded", "dataset")[META_FILE])
    vision_signature, text_signature = meta["parts"]["vision_encoder"][2], meta["parts"]["text_encoder"][2]
    for line in (
        f"| vision | `{tiny_vit}` | local files (signature `{vision_signature}`) |",
        f"| text | `{tiny_bert}` | local files (signature `{text_signature}`) |",
        "| `vision_layer_1` | vision | `hidden_states[1] · cls, 1 prefix token` | (32,) | float32 |",
        "| `vision_last_hidden_state` | vision | `last_hidden_state · cls, 1 prefix token` | (32,) | float32 |",
        "| `text_layer_0` | text | `hidden_states[0] · mean` | (32,) | float32 |",
        "Pooled hidden-state layers stored: vision [0, 1, 2]; text [0, 1, 2]",
        "- Source dataset: [`org/pics`](https://huggingface.co/datasets/org/pics); its licence: `cc-by-4.0`.",
        "- 11 rows in 3 Arrow files (sharded: one per source shard, from 11 source rows).",
        "- 1 sample skipped as bad.",
        "  - row 3, caption 0: ",  # the empty caption, with the reason the extraction gave
        f"- hf_align {hf_align.__version__}, cache format 2; bad samples: `skip`.",
        "- Image processor: `ViTImageProcessor`, size {'height': 32, 'width': 32}, mean [0.5, 0.5, 0.5]",
        f"- Tokenizer: `BertTokenizer` of `{tiny_bert}`",
        'features = hf_align.load_features("me/carded")',
        '    vision_source="last_hidden_state",\n    vision_pooling="cls",\n    text_source="last_hidden_state",\n'
        '    text_pooling="mean",\n)',
    ):
        assert line in card.text, line
    # the model the usage snippet builds fits the cache
    snippet = AlignerModel.from_encoders(
        tiny_vit,
        tiny_bert,
        vision_source="last_hidden_state",
        vision_pooling="cls",
        text_source="last_hidden_state",
        text_pooling="mean",
    )
    hf_align.check_features(sharded_cache, snippet)


def test_card_of_a_hub_encoder_pins_its_revision(stand_in_hub, single_cache, tmp_path):
    folder = tmp_path / "hub_encoder_cache"
    shutil.copytree(single_cache, folder)
    meta = json.loads((folder / META_FILE).read_text())
    meta["parts"]["vision_encoder"] = ["org/vit", "a" * 40, None]
    (folder / META_FILE).write_text(json.dumps(meta))
    hf_align.push_features(folder, "me/pinned")
    card = DatasetCard(stand_in_hub.files("me/pinned", "dataset")["README.md"].decode())
    assert f"| vision | `org/vit` | `{'a' * 40}` |" in card.text
    assert card.data.license is None and "its licence: not given" in card.text
    assert "- 11 rows in 1 Arrow file (single file)." in card.text


# ---------------------------------------------------------------------------------------------- CLI, branches
def test_cli_push_features_then_a_sharded_push_replaces_the_single_file(
    stand_in_hub, single_cache, sharded_cache, capsys
):
    argv = ["push-features", "--cache", single_cache, "--repo_id", "me/cli", "--source_license", "mit", "--private"]
    assert cli_main(argv) == 0
    assert stand_in_hub.created["dataset", "me/cli"]["visibility"] == "private"
    assert f"pushed {single_cache} to {stand_in_hub.url}/datasets/me/cli/commit/" in capsys.readouterr().out
    assert set(stand_in_hub.files("me/cli", "dataset")) == {META_FILE, "README.md", DATA_FILE}
    assert DatasetCard(stand_in_hub.files("me/cli", "dataset")["README.md"].decode()).data.license == "mit"
    hf_align.push_features(hf_align.features.open_feature_cache(sharded_cache), "me/cli", commit_message="resharded")
    # the old layout's Arrow file is deleted in the same commit: the repo holds one cache
    assert set(stand_in_hub.files("me/cli", "dataset")) == {META_FILE, "README.md", *data_files(sharded_cache)}
    assert_same_rows(hf_align.load_features("me/cli"), sharded_cache)


def test_push_to_a_branch_and_load_that_revision(stand_in_hub, single_cache, sharded_cache):
    hf_align.push_features(single_cache, "me/branched")
    hf_align.push_features(sharded_cache, "me/branched", revision="v2")
    assert DATA_FILE in stand_in_hub.files("me/branched", "dataset")
    assert DATA_FILE not in stand_in_hub.files("me/branched", "dataset", revision="v2")
    assert_same_rows(hf_align.load_features("me/branched", revision="v2"), sharded_cache)
    assert_same_rows(hf_align.load_features("me/branched", revision="v2", streaming=True), sharded_cache)
    assert len(hf_align.load_features("me/branched").cache_files) == 1


# ---------------------------------------------------------------------------------------------- the model check
def test_check_features_names_every_mismatch_with_both_values(cache, model):
    hf_align.check_features(cache, model)  # the model it was extracted with fits
    hf_align.check_features(hf_align.features.open_feature_cache(cache), model.config)
    config = copy.deepcopy(model.config)
    config.vision_encoder = "org/other-vit"
    config.text_revision = "b" * 40
    config.vision_pooling = "mean"
    config.text_source, config.text_pooling = "pooler_output", "none"
    with pytest.raises(FeatureCacheError) as raised:
        hf_align.check_features(cache, config)
    message = str(raised.value)
    assert message.startswith(f"the feature cache ({cache}) does not fit the model: ")
    for part in (
        f"vision encoder: the cache recorded {model.config.vision_encoder!r}, the model has 'org/other-vit'",
        f"text encoder revision of {model.config.text_encoder!r}: the cache recorded None, the model has '{'b' * 40}'",
        "vision tap of column 'vision_last_hidden_state': the cache recorded last_hidden_state · cls, 1 prefix "
        "token, the model reads last_hidden_state · mean, 1 prefix token",
        "text column 'text_pooler_output': missing from the cache, the model reads pooler_output from it",
    ):
        assert part in message, part


def test_check_features_compares_a_layer_and_its_width(single_cache, model):
    config = copy.deepcopy(model.config)
    config.vision_layer, config.vision_source, config.vision_pooling = 1, "hidden_states", "max"
    config.text_layer, config.text_source, config.text_pooling = 2, "hidden_states", "mean"
    config.text_hidden_size = 64
    with pytest.raises(FeatureCacheError) as raised:
        hf_align.load_features(single_cache, config)
    message = str(raised.value)
    assert (
        "vision tap of column 'vision_layer_1': the cache recorded hidden_states[1] · cls, 1 prefix token, the model "
        "reads hidden_states[1] · max, 1 prefix token" in message
    )
    assert "text width of column 'text_layer_2': the cache stores 32, the model has text_hidden_size=64" in message
    assert "text tap" not in message  # hidden_states[2] · mean is what the cache holds
    config.vision_pooling = "tokens"  # a token method's input: the cache stored pooled layers only
    with pytest.raises(
        FeatureCacheError,
        match=r"vision column 'vision_tokens_layer_1': missing from the cache, the model reads hidden_states\[1\] · "
        r"tokens, 1 prefix token from it \(cache columns: \['vision_layer_0', ",
    ):
        hf_align.check_features(single_cache, config)
    config.vision_layer = 3
    with pytest.raises(FeatureCacheError, match=r"vision layer: vision_layer=3 is out of range: the encoder exposes 3"):
        hf_align.check_features(single_cache, config)


def test_check_features_on_a_cache_without_metadata_checks_columns(model):
    plain = features_from_tensors({2: torch.randn(4, 32)}, {2: torch.randn(4, 32)})
    aligner = AlignerModel.from_feature_dims(32, 32, vision_pooling="cls", text_pooling="mean")
    hf_align.check_features(plain, aligner)  # layer -1 of a cache holding layer 2: the columns are there
    aligner.config.text_source, aligner.config.text_pooling = "sentence_embedding", "none"
    with pytest.raises(
        FeatureCacheError,
        match=r"^the feature cache \(without hf_align metadata\) does not fit the model: text column "
        r"'text_sentence_embedding': missing from the cache",
    ):
        hf_align.check_features(plain, aligner)
    with pytest.raises(TypeError, match="model must be an AlignerModel or an AlignerConfig, got dict"):
        hf_align.check_features(plain, {"vision_encoder": "x"})


# ---------------------------------------------------------------------------------------------- refused input
def test_push_refuses_what_is_not_a_finished_cache(single_cache, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(
        FeatureCacheError, match=r"'.*other' is not a finished hf_align feature cache: it has no hf_align_cache.json"
    ):
        hf_align.push_features(tmp_path / "other", "me/x")
    with pytest.raises(FileNotFoundError, match=r"cache='.*missing' is not a folder; give a feature cache folder"):
        hf_align.push_features(tmp_path / "missing", "me/x")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(single_cache, unfinished)
    meta = json.loads((unfinished / META_FILE).read_text())
    (unfinished / META_FILE).write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(
        FeatureCacheError,
        match=r"is not a finished hf_align feature cache: its hf_align_cache.json does not say complete=true",
    ):
        hf_align.push_features(unfinished, "me/x")
    with pytest.raises(FeatureCacheError, match=r"cache is an in-memory Dataset \(no Arrow files on disk\)"):
        hf_align.push_features(features_from_tensors({0: torch.randn(3, 4)}, {0: torch.randn(3, 4)}), "me/x")
    view = hf_align.features.open_feature_cache(single_cache).select([0, 1])
    with pytest.raises(FeatureCacheError, match=r"cache is a view of the feature cache '.*single' \(2 of its 11 rows"):
        hf_align.push_features(view, "me/x")


def test_push_refuses_a_damaged_cache_before_uploading(stand_in_hub, sharded_cache, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(sharded_cache, damaged)
    with open(damaged / "data" / "shard-00001.arrow", "r+b") as handle:
        handle.seek(-8, os.SEEK_END)
        handle.write(b"\0" * 8)  # same size, other bytes: only the checksum tells
    with pytest.raises(FeatureCacheError, match=r"is damaged: data/shard-00001.arrow has SHA-256"):
        hf_align.push_features(damaged, "me/damaged")
    assert ("dataset", "me/damaged") not in stand_in_hub.branches


def test_load_features_refuses_a_path_that_is_no_folder(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"repo_id_or_path='.*nowhere' is neither a local cache folder nor a Hub dataset id"
    ):
        hf_align.load_features(tmp_path / "nowhere")


def test_a_streamed_extraction_goes_to_the_hub_and_back(stand_in_hub, model, tmp_path):
    """The sharded cache `extract_features` writes from a `datasets.IterableDataset` (not the test's own writer)."""
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(8)]
    source = datasets.Dataset.from_dict(
        {"image": images, "caption": [f"picture {i}" for i in range(8)]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    ).to_iterable_dataset(num_shards=4)
    cache = extract_features(model, model.processor, source, cache_path=tmp_path / "streamed", batch_size=2)
    assert len(cache.cache_files) == 4
    hf_align.push_features(cache, "me/from-stream")
    assert {f"data/shard-{i:05d}.arrow" for i in range(4)} < set(stand_in_hub.files("me/from-stream", "dataset"))
    card = DatasetCard(stand_in_hub.files("me/from-stream", "dataset")["README.md"].decode())
    assert "- 8 rows in 4 Arrow files (sharded: one per source shard, from 8 source rows)." in card.text
    assert "source stream: num_shards `4`, stream `" in card.text
    assert_same_rows(hf_align.load_features("me/from-stream", model), cache)
    assert_same_rows(hf_align.load_features("me/from-stream", model, streaming=True), cache)


def test_check_features_compares_the_sentence_pipeline_and_auto_layers(tmp_path):
    """A hand-written cache (metadata beside its Arrow file) of a `sentence_embedding` text tap."""
    rows = features_from_tensors({0: torch.randn(5, 4)}, {0: torch.randn(5, 4)})
    rows = rows.rename_column("text_layer_0", "text_sentence_embedding")
    writer = ArrowWriter(path=str(tmp_path / DATA_FILE), features=rows.features)
    writer.write_table(rows.with_format("arrow")[:])
    writer.finalize()
    writer.close()
    parts = {
        "vision_encoder": ["org/vit", "c" * 40, None],
        "text_encoder": ["org/minilm", "d" * 40, None],
        "taps": {
            "vision": {"vision_layer_0": "hidden_states[0] · cls"},
            "text": {"text_sentence_embedding": "sentence_embedding"},
        },
        "text_pipeline": {"pooling_modes": ["mean"], "steps": []},
    }
    (tmp_path / META_FILE).write_text(json.dumps({"complete": True, "parts": parts}))
    cache = datasets.Dataset.from_file(str(tmp_path / DATA_FILE))
    aligner = AlignerModel.from_feature_dims(4, 4, vision_pooling="cls")
    config = aligner.config
    config.vision_encoder, config.vision_revision, config.vision_layer, config.vision_has_cls = (
        "org/vit",
        "c" * 40,
        0,
        False,
    )
    config.text_encoder, config.text_revision = "org/minilm", "d" * 40
    config.text_source, config.text_pooling = "sentence_embedding", "none"
    config.text_pipeline = {"pooling_modes": ["mean"], "steps": []}
    hf_align.check_features(cache, aligner)
    config.vision_layer = "auto"  # layer selection over the pooled vision layers the cache holds
    hf_align.check_features(cache, aligner)
    config.text_pipeline = {"pooling_modes": ["cls"], "steps": []}
    with pytest.raises(
        FeatureCacheError,
        match=r"does not fit the model: text sentence-transformers pipeline: the cache recorded \{'pooling_modes': "
        r"\['mean'\], 'steps': \[\]\}, the model has \{'pooling_modes': \['cls'\], 'steps': \[\]\}\. Extract",
    ):
        hf_align.check_features(cache, aligner)
    config.text_layer, config.text_source, config.text_pooling = "auto", "hidden_states", "mean"
    with pytest.raises(
        FeatureCacheError,
        match=r"text layer: the model's text_layer is 'auto' \(layer selection\), the cache holds no pooled text layers",
    ):
        hf_align.check_features(cache, aligner)
