"""A saved aligner loads as a multimodal `SentenceTransformer` (sentence-transformers 6 finds `get_text_features` and
`get_image_features`), and its `encode()` of captions and of images is the aligner's embeddings."""

from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer

from hf_align import AlignerModel
from hf_align.testing import digits_dataset

# Different token lengths, so the batches are padded.
CAPTIONS = ["seven", "a handwritten digit three", "the number zero drawn by hand on white paper", "a cat"]


@pytest.fixture(scope="module")
def aligner_dir(tiny_vit, minilm, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sentence_transformers") / "aligner")
    torch.manual_seed(0)
    AlignerModel.from_encoders(tiny_vit, minilm, projection_dim=16).save_pretrained(path)
    return path


@torch.no_grad()
def test_encode_matches_the_aligner(aligner_dir):
    model = AlignerModel.from_pretrained(aligner_dir)
    encoder = SentenceTransformer(aligner_dir, device="cpu")

    texts = encoder.encode(CAPTIONS, batch_size=3, convert_to_tensor=True)
    expected = model.get_text_features(**model.processor(text=CAPTIONS))
    assert texts.shape == (len(CAPTIONS), model.aligner.embed_dim)
    assert torch.all(torch.cosine_similarity(texts, expected) > 1 - 1e-5)

    images = digits_dataset(5)[:]["image"]
    pictures = encoder.encode(images, batch_size=2, convert_to_tensor=True)
    expected_images = model.get_image_features(**model.processor(images=images))
    assert pictures.shape == (5, model.aligner.embed_dim)
    assert torch.all(torch.cosine_similarity(pictures, expected_images) > 1 - 1e-5)

    # sentence-transformers' similarity (cosine) of the two is the aligner's, before the temperature
    scores = encoder.similarity(pictures, texts)
    torch.testing.assert_close(scores, expected_images @ expected.t(), atol=1e-5, rtol=1e-5)


def test_model_card_says_how_to_use_the_aligner_from_sentence_transformers(aligner_dir):
    card = (Path(aligner_dir) / "README.md").read_text(encoding="utf-8")
    assert f'`SentenceTransformer("{aligner_dir}").encode(...)` of captions\nor PIL images' in card
    assert f'hf_align.create_model_and_transforms("{aligner_dir}")' in card
