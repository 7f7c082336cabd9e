"""Artefacts saved by earlier hf_align versions load with today's code and compute what they computed when saved:
the first release (tests/fixtures/release_0_1_0) and 0.2.0.dev0 before the package became folders
(tests/fixtures/release_0_2_0_dev0)."""

import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from hf_align import AlignerModel, load_cache
from hf_align.testing import minilm_path

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "release_0_2_0_dev0")
RELEASE_0_1_0 = os.path.join(os.path.dirname(__file__), "fixtures", "release_0_1_0")


@pytest.fixture(scope="module")
def encoders():
    vision = AutoModel.from_pretrained(os.path.join(FIXTURES, "vision_encoder"))
    text = AutoModel.from_pretrained(minilm_path())
    return vision, text


def test_a_saved_aligner_computes_what_it_computed_when_saved(encoders):
    vision, text = encoders
    model = AlignerModel.from_pretrained(os.path.join(FIXTURES, "aligner"), vision_model=vision, text_model=text)
    expected = load_file(os.path.join(FIXTURES, "aligner_expected.safetensors"))
    model.eval()
    with torch.no_grad():
        out = model(
            pixel_values=expected["pixel_values"],
            input_ids=expected["input_ids"],
            attention_mask=expected["attention_mask"],
        )
    for name in ("image_embeds", "text_embeds", "logits_per_image"):
        torch.testing.assert_close(getattr(out, name), expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert model.config.method == "mlp" and model.config.similarity == "bilinear"
    assert model.regularizers["structure"].weight == 2.0


def test_a_saved_aligner_only_model_loads_through_the_auto_class():
    model = AutoModel.from_pretrained(os.path.join(FIXTURES, "aligner_codebook"))  # no encoders recorded
    assert isinstance(model, AlignerModel)
    expected = load_file(os.path.join(FIXTURES, "aligner_codebook_expected.safetensors"))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.aligner.embed_image(expected["vision"]), expected["image_embeds"])
        torch.testing.assert_close(model.aligner.embed_text(expected["text"]), expected["text_embeds"])


def test_a_saved_feature_cache_loads_with_its_rows():
    cache = load_cache(os.path.join(FIXTURES, "feature_cache"), verify_checksum=True)
    assert cache is not None and len(cache) == 4
    assert cache.column_names == [
        "vision_layer_2",
        "vision_last_hidden_state",
        "text_layer_6",
        "text_sentence_embedding",
        "image_id",
    ]
    assert cache["image_id"] == [0, 1, 2, 3]
    row = cache.with_format("torch")[0]
    assert row["vision_last_hidden_state"].shape == (32,)  # the tiny ViT's CLS token
    assert row["text_sentence_embedding"].shape == (384,)
    torch.testing.assert_close(row["text_sentence_embedding"].norm(), torch.tensor(1.0))  # MiniLM's Normalize step


def test_an_aligner_saved_by_the_first_release_computes_what_it_computed():
    model = AlignerModel.from_pretrained(os.path.join(RELEASE_0_1_0, "aligner_mlp"))
    assert model.config.hf_align_version == "0.1.0" and model.regularizers["structure"].weight == 2.0
    expected = load_file(os.path.join(RELEASE_0_1_0, "aligner_mlp_expected.safetensors"))
    model.eval()
    with torch.no_grad():
        out = model(vision_features=expected["vision"], text_features=expected["text"])
    for name in ("image_embeds", "text_embeds", "logits_per_image"):
        torch.testing.assert_close(getattr(out, name), expected[name], rtol=1e-5, atol=1e-5, msg=name)


def test_a_feature_cache_written_by_the_first_release_loads_with_its_rows():
    cache = load_cache(os.path.join(RELEASE_0_1_0, "feature_cache"))
    assert cache is not None and cache.column_names == ["vision_layer_2", "text_layer_6", "image_id"]
    assert cache["image_id"] == [0, 1, 2, 3]
    row = cache.with_format("torch")[3]
    assert row["vision_layer_2"].shape == (32,) and row["text_layer_6"].shape == (384,)
    assert torch.isfinite(row["vision_layer_2"]).all() and row["text_layer_6"].abs().sum() > 0
