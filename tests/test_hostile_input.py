"""Hostile and odd input: each sample is either converted correctly or rejected with an error naming its row, and a bad
sample never poisons the rest of its batch."""

import dataclasses
import io
import logging

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_align import AlignerModel
from hf_align.evaluation import retrieval_metrics, zero_shot_metrics
from hf_align.features import BadSampleError, extract_features, skipped_samples
from hf_align.model.templates import class_prototypes

IMAGE_FEATURES = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
GRAY = (128, 128, 128)


def encoded(image: Image.Image, fmt: str = "PNG") -> dict:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return {"bytes": buffer.getvalue(), "path": None}


def truncated_jpeg() -> dict:
    data = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    return {"bytes": data["bytes"][: len(data["bytes"]) // 2], "path": None}


def image_dataset(images, captions=None) -> datasets.Dataset:
    captions = captions or [f"photo {i}" for i in range(len(images))]
    return datasets.Dataset.from_dict({"image": images, "caption": captions}, features=IMAGE_FEATURES)


@pytest.fixture(scope="module")
def model(tiny_vit, tiny_bert):
    return AlignerModel.from_encoders(tiny_vit, tiny_bert, projection_dim=8)


def vision(features) -> torch.Tensor:
    return torch.tensor(features["vision_layer_2"])


def text(features) -> torch.Tensor:
    return torch.tensor(features["text_layer_2"])


# ---------------------------------------------------------------------------------------------- images
def test_odd_image_modes_and_sizes_become_the_rgb_image_they_show(model, tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (40, 40), dtype=np.uint8)
    rgb = Image.fromarray(np.stack([pixels] * 3, -1))
    images = [
        encoded(rgb),  # 0: the reference
        encoded(Image.fromarray(pixels)),  # 1: grayscale "L"
        encoded(Image.fromarray(pixels.astype(np.uint16) * 257)),  # 2: 16-bit grayscale, same picture
        encoded(Image.fromarray(pixels.astype(np.float32) / 255.0), "TIFF"),  # 3: float in [0, 1]
        encoded(Image.fromarray(np.dstack([np.stack([pixels] * 3, -1), np.full((40, 40), 255, np.uint8)]))),  # 4: RGBA
        encoded(Image.new("RGBA", (40, 40), (0, 0, 0, 0))),  # 5: fully transparent -> white
        encoded(Image.new("RGB", (40, 40), (255, 255, 255))),  # 6: white
        encoded(Image.new("CMYK", (40, 40), (0, 0, 0, 127)), "JPEG"),  # 7: CMYK
        encoded(Image.new("RGB", (1, 1), GRAY)),  # 8: 1x1 px
        encoded(Image.new("L", (10_000, 10_000), 128)),  # 9: 10k x 10k px, downsampled before the processor
        encoded(Image.new("RGB", (40, 40), GRAY)),  # 10: what 8 and 9 show
        encoded(Image.new("RGB", (40, 40), (128, 128, 128)), "JPEG"),  # 11: what 7 shows (JPEG keeps flat grey)
    ]
    assert Image.open(io.BytesIO(images[2]["bytes"])).mode in ("I;16", "I")
    assert Image.open(io.BytesIO(images[3]["bytes"])).mode == "F"
    features = extract_features(model, model.processor, image_dataset(images), cache_dir=tmp_path, batch_size=4)
    x = vision(features)
    assert x.shape == (12, 32) and torch.isfinite(x).all()
    for same, as_ in [(1, 0), (2, 0), (3, 0), (4, 0), (5, 6), (8, 10), (9, 10), (7, 11)]:
        torch.testing.assert_close(x[same], x[as_], rtol=0, atol=1e-5, msg=f"image {same} should encode as image {as_}")
    assert not torch.allclose(x[0], x[10], atol=1e-3)  # and the encoder does tell different pictures apart


def test_undecodable_images_raise_naming_the_row(model, tmp_path):
    good = encoded(Image.new("RGB", (8, 8), GRAY))
    cases = [
        (truncated_jpeg(), r"row 2: 'image': cannot be decoded as an image \(OSError: image file is truncated"),
        ({"bytes": b"%PDF-1.4 definitely not an image", "path": None}, r"row 2: 'image': cannot be decoded"),
        (
            {"bytes": None, "path": str(tmp_path / "missing.png")},
            r"row 2: 'image': cannot be decoded.*FileNotFoundError",
        ),
    ]
    for bad, message in cases:
        with pytest.raises(BadSampleError, match=message):
            extract_features(model, model.processor, image_dataset([good, good, bad]), cache_dir=tmp_path / "c")
    assert not list((tmp_path / "c").iterdir())  # nothing half-written was left behind


def test_skip_policy_leaves_bad_samples_out_and_records_them(model, tmp_path):
    rng = np.random.default_rng(2)
    goods = [encoded(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))) for _ in range(3)]
    images = [goods[0], {"bytes": b"garbage", "path": None}, goods[1], truncated_jpeg(), goods[2]]
    captions = ["one", "two", "three", "four", "   "]
    features = extract_features(
        model, model.processor, image_dataset(images, captions), cache_dir=tmp_path, on_bad_sample="skip"
    )
    assert features["image_id"] == [0, 2]
    skipped = skipped_samples(features)
    assert [(s["row"], s["caption"]) for s in skipped] == [(1, None), (3, None), (4, None)]
    assert "cannot be decoded" in skipped[0]["reason"] and "truncated" in skipped[1]["reason"]
    assert skipped[2]["reason"] == "'caption': empty caption"
    # the surviving rows are exactly what they are without the bad ones in their batch
    clean = extract_features(
        model, model.processor, image_dataset([goods[0], goods[1]], ["one", "three"]), cache_dir=tmp_path
    )
    torch.testing.assert_close(vision(features), vision(clean), rtol=0, atol=1e-6)
    torch.testing.assert_close(text(features), text(clean), rtol=0, atol=1e-6)
    assert skipped_samples(clean) == []
    with pytest.raises(ValueError, match=r"on_bad_sample must be one of \('raise', 'skip'\), got 'ignore'"):
        extract_features(model, model.processor, image_dataset(goods), cache_dir=tmp_path, on_bad_sample="ignore")


def test_every_sample_bad_is_an_error_even_when_skipping(model, tmp_path):
    with pytest.raises(BadSampleError, match="every sample of the dataset was bad"):
        extract_features(
            model, model.processor, image_dataset([truncated_jpeg()] * 2), cache_dir=tmp_path, on_bad_sample="skip"
        )


# ---------------------------------------------------------------------------------------------- captions
def test_bad_captions_raise_naming_row_and_caption(model, tmp_path):
    image = encoded(Image.new("RGB", (8, 8), GRAY))
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string"))})
    cases = [
        ([["fine"], [""]], r"row 1, caption 0: 'caption': empty caption"),
        ([["fine", None]], r"row 0, caption 1: 'caption': missing caption \(None\)"),
        ([["fine"], []], r"row 1: 'caption' holds an empty list of captions"),
    ]
    for captions, message in cases:
        dataset = datasets.Dataset.from_dict({"image": [image] * len(captions), "caption": captions}, features=features)
        with pytest.raises(BadSampleError, match=message):
            extract_features(model, model.processor, dataset, cache_dir=tmp_path)
    numbers = datasets.Dataset.from_dict({"image": [image], "caption": [7]}).cast_column("image", datasets.Image())
    with pytest.raises(BadSampleError, match=r"row 0: 'caption': a caption must be a string, got int"):
        extract_features(model, model.processor, numbers, cache_dir=tmp_path)


def test_caption_bytes_are_decoded_or_refused(model, tmp_path):
    image = encoded(Image.new("RGB", (8, 8), GRAY))
    schema = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("binary")})
    as_bytes = datasets.Dataset.from_dict({"image": [image], "caption": ["café".encode()]}, features=schema)
    as_text = image_dataset([image], ["café"])
    torch.testing.assert_close(
        text(extract_features(model, model.processor, as_bytes, cache_dir=tmp_path)),
        text(extract_features(model, model.processor, as_text, cache_dir=tmp_path)),
    )
    latin1 = datasets.Dataset.from_dict(
        {"image": [image, image], "caption": [b"ok", "café".encode("latin-1")]}, features=schema
    )
    with pytest.raises(
        BadSampleError, match=r"row 1: 'caption': the caption bytes are not valid UTF-8 \(at byte 3: b'\\xe9'\)"
    ):
        extract_features(model, model.processor, latin1, cache_dir=tmp_path)


def test_100k_character_caption_is_truncated_with_a_warning(model, tmp_path, caplog):
    image = encoded(Image.new("RGB", (8, 8), GRAY))
    # the tiny BERT has 128 positions although its (MiniLM) tokenizer allows 512: the encoder's limit wins
    long_caption = "word " * 20_000
    with caplog.at_level(logging.WARNING, logger="hf_align.features"):
        features = extract_features(
            model, model.processor, image_dataset([image, image], ["short", long_caption]), cache_dir=tmp_path
        )
    assert (
        "1 caption(s) longer than the text encoder's limit of 128 tokens were truncated to it: rows [1] "
        "(longest: 20002 tokens)" in caplog.text
    )
    cut = extract_features(model, model.processor, image_dataset([image], ["word " * 126]), cache_dir=tmp_path)
    torch.testing.assert_close(text(features)[1], text(cut)[0], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- encoder outputs
def test_nan_in_encoder_output_names_the_row_and_is_skippable(model, tmp_path, monkeypatch):
    images = [encoded(Image.new("RGB", (8, 8), (red, 0, 0))) for red in (0, 40, 255, 80)]
    original = model.vision_outputs

    def poisoned(pixel_values):  # the encoder "overflows" on the pure red image (row 2), and only on it
        outputs = original(pixel_values)
        poison = pixel_values[:, 0, 0, 0] > 0.9  # red 255 normalises to 1.0, the others to <= -0.37

        def nan(state):
            return torch.where(poison.view(-1, *[1] * (state.dim() - 1)), float("nan"), state)

        return dataclasses.replace(
            outputs,
            hidden_states=tuple(nan(s) for s in outputs.hidden_states),
            last_hidden_state=nan(outputs.last_hidden_state),
            pooler_output=nan(outputs.pooler_output),
        )

    monkeypatch.setattr(model, "vision_outputs", poisoned)
    with pytest.raises(BadSampleError, match=r"row 2: NaN or Inf in the vision encoder's output at layer 2"):
        extract_features(model, model.processor, image_dataset(images), cache_dir=tmp_path)
    features = extract_features(model, model.processor, image_dataset(images), cache_dir=tmp_path, on_bad_sample="skip")
    assert features["image_id"] == [0, 1, 3]
    assert torch.isfinite(vision(features)).all()
    monkeypatch.undo()
    clean = extract_features(model, model.processor, image_dataset(images), cache_dir=tmp_path)
    torch.testing.assert_close(vision(features), vision(clean)[[0, 1, 3]], rtol=0, atol=1e-6)


def test_model_refuses_nan_and_inf_features_by_argument_name():
    model = AlignerModel.from_feature_dims(6, 4, projection_dim=3)
    good_v, good_t = torch.randn(3, 6), torch.randn(3, 4)
    bad_v = good_v.clone()
    bad_v[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"`vision_features` holds NaN or Inf in 1 of 3 rows \(rows \[1\]\)"):
        model.get_image_features(vision_features=bad_v)
    bad_t = good_t.clone()
    bad_t[0, 0], bad_t[2, 3] = float("inf"), float("-inf")
    with pytest.raises(ValueError, match=r"`text_features` holds NaN or Inf in 2 of 3 rows \(rows \[0, 2\]\)"):
        model(vision_features=good_v, text_features=bad_t, return_loss=True)
    assert torch.isfinite(model(vision_features=good_v, text_features=good_t, return_loss=True).loss)


def test_check_finite_false_skips_the_feature_check_for_prechecked_callers():
    # train() checks the cache once at load and passes check_finite=False: the features go through unchecked, so the
    # NaN row reaches the embeddings (and only its own row and column of the scores).
    model = AlignerModel.from_feature_dims(6, 4, projection_dim=3)
    vision, text = torch.randn(3, 6), torch.randn(3, 4)
    vision[1, 2] = float("nan")
    embeds = model.get_image_features(vision_features=vision, check_finite=False)
    assert torch.isnan(embeds[1]).all() and torch.isfinite(embeds[[0, 2]]).all()
    logits = model(vision_features=vision, text_features=text, check_finite=False).logits_per_image
    assert torch.isnan(logits[1]).all() and torch.isfinite(logits[[0, 2]]).all()
    text[2, 0] = float("inf")
    assert torch.isnan(model.get_text_features(text_features=text, check_finite=False)[2]).all()
    with pytest.raises(ValueError, match=r"`text_features` holds NaN or Inf in 1 of 3 rows \(rows \[2\]\)"):
        model.get_text_features(text_features=text)


def test_nan_pixels_are_blamed_on_the_encoder_output(model):
    pixel_values = torch.zeros(2, 3, 32, 32)
    pixel_values[1, 0, 0, 0] = float("nan")
    with pytest.raises(
        ValueError,
        match=r"the vision encoder's output for `pixel_values` \(vision_layer=-1\) holds NaN or Inf in 1 of 2 rows "
        r"\(rows \[1\]\)",
    ):
        model.get_image_features(pixel_values=pixel_values)


# ---------------------------------------------------------------------------------------------- evaluation
def test_class_names_empty_or_duplicated_are_refused(model):
    with pytest.raises(ValueError, match="class_names is empty"):
        class_prototypes(model, model.processor, [])
    with pytest.raises(ValueError, match=r"class_names has duplicates \['cat'\]"):
        class_prototypes(model, model.processor, ["cat", "dog", "cat"])


def test_metrics_refuse_nan_scores_and_empty_input():
    scores = torch.eye(3)
    scores[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"logits_per_image holds NaN scores in 1 row\(s\), e.g. rows \[1\]"):
        retrieval_metrics(scores, [0, 1, 2])
    with pytest.raises(ValueError, match=r"logits holds NaN scores"):
        zero_shot_metrics(scores, [0, 1, 2])
    with pytest.raises(ValueError, match=r"at least one sample and one class, got logits of shape \(0, 3\)"):
        zero_shot_metrics(torch.zeros(0, 3), [])
    with pytest.raises(ValueError, match=r"ks must be positive ints, got \[0, 1\]"):
        retrieval_metrics(torch.eye(3), [0, 1, 2], ks=(0, 1))
    with pytest.raises(ValueError, match=r"logits_per_image must be a \(n_images, n_texts\) matrix, got shape \(3,\)"):
        retrieval_metrics(torch.ones(3), [0, 1, 2])
