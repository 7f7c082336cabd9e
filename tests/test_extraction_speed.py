"""Fast extraction without changing what is extracted: worker processes, length-sorted caption chunks, SDPA.

(Speed itself is measured by benchmarks/bench_extraction.py; these tests pin the output.)
"""

import io
import json
import os

import datasets
import numpy as np
import pytest
import torch

from hf_align import AlignerModel
from hf_align.features import META_FILE, BadSampleError, extract_features, skipped_samples
from hf_align.testing import digits_dataset

CAPTION_SCHEMA = datasets.Features(
    {
        "image": datasets.Image(decode=False),
        "label": datasets.ClassLabel(names=[str(i) for i in range(10)]),
        "caption": datasets.Sequence(datasets.Value("string")),
    }
)


def captioned_digits(n: int, bad_rows: tuple[int, ...] = ()) -> datasets.Dataset:
    """`n` digits, 2 captions each of lengths that vary within every batch; `bad_rows` get an undecodable image."""
    digits = digits_dataset(n)
    columns = {"image": [], "label": digits["label"], "caption": []}
    for i, image in enumerate(digits["image"]):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        columns["image"].append({"bytes": b"garbage" if i in bad_rows else buffer.getvalue(), "path": None})
        words = ["a", "handwritten", "digit", "drawn", "slowly", "in", "black", "ink"]
        columns["caption"].append([" ".join(words[: 1 + (i * 3) % 8]), " ".join(words[: 1 + (i * 5 + 2) % 8])])
    return datasets.Dataset.from_dict(columns, features=CAPTION_SCHEMA)


@pytest.fixture(scope="module")
def model(tiny_vit, tiny_bert):
    return AlignerModel.from_encoders(tiny_vit, tiny_bert, projection_dim=8)


def cache_record(features) -> dict:
    with open(
        os.path.join(os.path.dirname(features.cache_files[0]["filename"]), META_FILE), encoding="utf-8"
    ) as handle:
        return json.load(handle)["data_file"]


def test_worker_processes_write_the_very_same_cache(model, tmp_path):
    data = captioned_digits(40, bad_rows=(13,))
    kwargs = dict(batch_size=8, keep_columns=["label"], on_bad_sample="skip")
    inline = extract_features(model, model.processor, data, cache_dir=tmp_path / "inline", num_workers=0, **kwargs)
    workers = extract_features(model, model.processor, data, cache_dir=tmp_path / "workers", num_workers=2, **kwargs)
    assert cache_record(inline) == cache_record(workers)  # same size and SHA-256: byte for byte the same Arrow file
    assert len(inline) == 78
    for skipped in (skipped_samples(inline), skipped_samples(workers)):
        assert [(s["row"], s["caption"]) for s in skipped] == [(13, None)]
        assert skipped[0]["reason"].startswith("'image': cannot be decoded as an image (UnidentifiedImageError")
    assert workers["image_id"][24:30] == [12, 12, 14, 14, 15, 15]  # source order kept around the skipped row
    assert workers["label"] == [label for i, label in enumerate(data["label"]) for _ in range(2) if i != 13]


def test_captions_are_encoded_in_length_sorted_chunks_and_written_in_source_order(model, tmp_path, monkeypatch):
    data = captioned_digits(8)
    tokenizer = model.processor.tokenizer
    captions = [c for pair in data["caption"] for c in pair]
    lengths = [len(ids) for ids in tokenizer(captions)["input_ids"]]
    widths = []
    original = model.text_outputs

    def recording(input_ids, attention_mask=None, token_type_ids=None, fixed_length=None):
        widths.append(tuple(input_ids.shape))
        return original(input_ids, attention_mask, token_type_ids, fixed_length)

    monkeypatch.setattr(model, "text_outputs", recording)
    features = extract_features(model, model.processor, data, batch_size=4, cache_dir=tmp_path, num_workers=0)
    # each batch of 4 images has 8 captions: sorted by length, in 2 chunks of 4, each padded to its own longest; one
    # text encoder pass per chunk gives both stored columns (the tapped last hidden state and what the tap reads)
    assert features.column_names == [
        "vision_layer_2",
        "vision_last_hidden_state",
        "text_layer_2",
        "text_last_hidden_state",
        "image_id",
    ]
    expected = []
    for batch in (lengths[:8], lengths[8:]):
        ordered = sorted(batch)
        expected += [(4, max(ordered[:4])), (4, max(ordered[4:]))]
    assert widths == expected
    unsorted = 8 * max(lengths[:8]) + 8 * max(lengths[8:])  # token slots with each batch padded to its longest
    assert sum(rows * width for rows, width in widths) < unsorted
    monkeypatch.undo()
    # row r holds caption r in source order: equal to that caption encoded alone (no padding at all)
    assert features["image_id"] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]
    with torch.no_grad():
        alone = torch.stack([model.tapped_text_features(**tokenizer([c], return_tensors="pt"))[0][0] for c in captions])
    torch.testing.assert_close(torch.tensor(features["text_last_hidden_state"]), alone, rtol=0, atol=1e-5)


def test_text_token_columns_come_back_in_source_order(tiny_vit, tiny_bert, tmp_path):
    model = AlignerModel.from_encoders(tiny_vit, tiny_bert, method="token_relative", num_anchors=4)
    data = captioned_digits(6)
    features = extract_features(model, model.processor, data, batch_size=3, cache_dir=tmp_path, num_workers=2)
    tokenizer = model.processor.tokenizer
    captions = [c for pair in data["caption"] for c in pair]
    tokens = features.with_format("numpy")[:]["text_tokens_last_hidden_state"]  # what a token method's tap reads
    for caption, stored in zip(captions, tokens):
        inputs = tokenizer([caption], return_tensors="pt")
        with torch.no_grad():
            alone = model.text_outputs(**inputs).last_hidden_state[0]
        assert np.asarray(stored).shape == tuple(alone.shape)  # its own tokens, no padding
        torch.testing.assert_close(
            torch.as_tensor(np.asarray(stored, dtype=np.float32)), alone, rtol=0, atol=2e-3
        )  # fp16


def test_encoders_run_with_pytorch_sdpa_attention(model):
    assert model.vision_model.config._attn_implementation == "sdpa"
    assert model.text_model.config._attn_implementation == "sdpa"


def test_num_workers_is_checked(model, tmp_path):
    data = captioned_digits(2)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=rf"num_workers must be None or an int >= 0, got {bad!r}"):
            extract_features(model, model.processor, data, cache_dir=tmp_path, num_workers=bad)


def test_a_bad_image_met_in_a_worker_is_raised_by_the_caller_naming_its_row(model, tmp_path):
    data = captioned_digits(12, bad_rows=(9,))
    with pytest.raises(BadSampleError, match=r"^row 9: 'image': cannot be decoded as an image"):
        extract_features(model, model.processor, data, batch_size=4, cache_dir=tmp_path, num_workers=2)
    assert os.listdir(tmp_path) == []  # nothing half-written left
