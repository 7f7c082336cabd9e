"""Pipelines on saved aligners: the stock zero-shot task for every registered method, hf_align's cached zero-shot task
and gallery retrieval. Tiny random encoders (a 2-block ViT and a 2-block BERT with MiniLM's tokenizer), offline."""

import pytest
import torch
from transformers import pipeline

from hf_align import AlignerModel
from hf_align.integrations.pipelines import (
    RETRIEVAL_TASK,
    ZERO_SHOT_TASK,
    AlignerImageTextRetrievalPipeline,
    AlignerZeroShotImageClassificationPipeline,
    register_pipelines,
)
from hf_align.methods import METHODS

# Small settings so every method builds in milliseconds; a method missing here runs with its defaults.
SMALL_SETTINGS = {
    "linear": {"projection_dim": 16},
    "mlp": {"projection_dim": 16, "hidden_dim": 32},
    "relative": {"num_anchors": 16},
    "asif": {"num_anchors": 32, "topk": 8},
    "codebook": {"projection_dim": 16, "num_codes": 8},
    "token_relative": {"num_anchors": 16},
}
# Different token lengths, so the batch of prompts is padded.
LABELS = ["cat", "a big red car", "a small dog asleep on an old sofa"]
TEMPLATE = "a photo of {}."


@pytest.fixture(scope="module")
def encoders(tiny_vit, tiny_bert):
    """(vision folder, text folder) of the session's tiny encoders."""
    return tiny_vit, tiny_bert


def build_aligner(encoders, method: str) -> AlignerModel:
    """A fresh aligner of `method` on the tiny encoders, data-initialised on random features (asif needs anchors)."""
    model = AlignerModel.from_encoders(*encoders, method=method, **SMALL_SETTINGS.get(method, {}))
    generator = torch.Generator().manual_seed(0)
    d_v, d_t = model.config.vision_hidden_size, model.config.text_hidden_size
    if model.aligner.input_kind == "tokens":
        vision, text = torch.randn(64, 5, d_v, generator=generator), torch.randn(64, 7, d_t, generator=generator)
        masks = {"vision_mask": torch.ones(64, 5, dtype=torch.bool), "text_mask": torch.ones(64, 7, dtype=torch.bool)}
    else:
        vision, text, masks = torch.randn(64, d_v, generator=generator), torch.randn(64, d_t, generator=generator), {}
    with torch.no_grad():
        model.aligner.init_from_data(vision, text, seed=0, **masks)
    return model


@pytest.fixture(scope="module")
def linear_dir(encoders, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("aligner") / "linear")
    build_aligner(encoders, "linear").save_pretrained(path)
    return path


def by_label(result: list[dict]) -> torch.Tensor:
    scores = {r["label"]: r["score"] for r in result}
    return torch.tensor([scores[label] for label in LABELS])


@torch.no_grad()
def reference_scores(model: AlignerModel, image) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(logits_per_image) of `model` on the padded batch of prompts, and on each prompt alone (no padding)."""
    prompts = [TEMPLATE.format(label) for label in LABELS]
    batched = model(**model.processor(images=[image], text=prompts)).logits_per_image[0].softmax(-1)
    alone = torch.cat([model(**model.processor(images=[image], text=[p])).logits_per_image[0] for p in prompts])
    return batched, alone.softmax(-1)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_stock_zero_shot_pipeline_matches_model_for_every_method(method, encoders, random_images, tmp_path):
    model = build_aligner(encoders, method)
    model.save_pretrained(tmp_path)
    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path))
    assert isinstance(classifier.model, AlignerModel)

    result = classifier(random_images[0], candidate_labels=LABELS, hypothesis_template=TEMPLATE)
    assert [r["score"] for r in result] == sorted((r["score"] for r in result), reverse=True)
    batched, alone = reference_scores(model, random_images[0])
    assert batched.max() - batched.min() > 1e-3, "degenerate scores would make the comparison vacuous"
    # The padded batch scores like each prompt alone: attention masks reach the (token) methods.
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_label(result), batched, atol=1e-6, rtol=0)


def test_cached_zero_shot_pipeline_runs_text_tower_once_per_label_set(linear_dir, random_images):
    register_pipelines()
    stock = pipeline("zero-shot-image-classification", model=linear_dir)
    classifier = pipeline(task=ZERO_SHOT_TASK, model=linear_dir, label_cache_size=2)
    assert isinstance(classifier, AlignerZeroShotImageClassificationPipeline)
    text_calls, vision_calls = [], []
    classifier.model.text_model.register_forward_hook(lambda *args: text_calls.append(1))
    classifier.model.vision_model.register_forward_hook(lambda *args: vision_calls.append(1))

    first = [classifier(image, candidate_labels=LABELS, hypothesis_template=TEMPLATE) for image in random_images]
    assert (len(text_calls), len(vision_calls)) == (1, 4)
    for image, result in zip(random_images, first):
        assert result == stock(image, candidate_labels=LABELS, hypothesis_template=TEMPLATE)  # identical floats

    # Batched through the DataLoader: still no text forward, same scores (up to batched-matmul rounding).
    batched = classifier(random_images, candidate_labels=LABELS, hypothesis_template=TEMPLATE, batch_size=3)
    assert len(text_calls) == 1 and len(vision_calls) == 4 + 2
    for one, other in zip(batched, first):
        torch.testing.assert_close(by_label(one), by_label(other), atol=1e-6, rtol=0)

    # Labels, template and tokenizer settings each key the cache; the LRU keeps the 2 most recent sets.
    classifier(random_images[0], candidate_labels=LABELS[:2], hypothesis_template=TEMPLATE)
    classifier(random_images[0], candidate_labels=LABELS, hypothesis_template="{}")
    assert len(text_calls) == 3
    classifier(random_images[0], candidate_labels=LABELS, hypothesis_template=TEMPLATE)  # evicted by the two above
    assert len(text_calls) == 4
    truncated = classifier(
        random_images[0],
        candidate_labels=LABELS,
        hypothesis_template=TEMPLATE,
        tokenizer_kwargs={"max_length": 4, "truncation": True},
    )
    assert len(text_calls) == 5
    assert truncated != first[0]
    classifier.clear_label_cache()
    classifier(random_images[0], candidate_labels=LABELS, hypothesis_template=TEMPLATE)
    assert len(text_calls) == 6


def test_cached_zero_shot_pipeline_masks_padding_when_the_tokenizer_gives_no_mask(linear_dir, random_images):
    register_pipelines()
    expected = pipeline(ZERO_SHOT_TASK, model=linear_dir)(random_images[0], candidate_labels=LABELS)
    classifier = pipeline(ZERO_SHOT_TASK, model=linear_dir)
    classifier.tokenizer.model_input_names = ["input_ids"]  # like SigLIP's tokenizer: no attention mask by default
    assert "attention_mask" not in classifier.tokenizer(LABELS, padding=True)
    assert classifier(random_images[0], candidate_labels=LABELS) == expected


def test_cached_zero_shot_pipeline_dtype(linear_dir, random_images):
    register_pipelines()
    full = pipeline(ZERO_SHOT_TASK, model=linear_dir)(random_images[0], candidate_labels=LABELS)
    half = pipeline(ZERO_SHOT_TASK, model=linear_dir, dtype=torch.bfloat16)
    assert half.model.dtype == torch.bfloat16 and next(half.model.vision_model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(
        by_label(half(random_images[0], candidate_labels=LABELS)), by_label(full), atol=3e-2, rtol=0
    )


def test_zero_shot_pipeline_errors(linear_dir, random_images):
    register_pipelines()
    classifier = pipeline(ZERO_SHOT_TASK, model=linear_dir)
    for bad in ([], "cat", ["cat", 3]):
        with pytest.raises(ValueError, match="candidate_labels must be a non-empty list of strings"):
            classifier(random_images[0], candidate_labels=bad)
    with pytest.raises(ValueError, match="label_cache_size must be a positive int, got 0"):
        pipeline(ZERO_SHOT_TASK, model=linear_dir, label_cache_size=0)
    with pytest.raises(TypeError, match="needs an hf_align AlignerModel, got ViTModel"):
        AlignerZeroShotImageClassificationPipeline(
            model=classifier.model.vision_model,
            tokenizer=classifier.tokenizer,
            image_processor=classifier.image_processor,
        )
    bare = AlignerModel.from_pretrained(linear_dir, load_encoders=False)
    with pytest.raises(ValueError, match="has none attached"):
        AlignerImageTextRetrievalPipeline(
            model=bare, tokenizer=classifier.tokenizer, image_processor=classifier.image_processor
        )


@torch.no_grad()
def test_retrieval_pipeline_top_k_both_directions(linear_dir, random_images):
    register_pipelines()
    retriever = pipeline(RETRIEVAL_TASK, model=linear_dir)
    assert isinstance(retriever, AlignerImageTextRetrievalPipeline)
    model, processor = retriever.model, retriever.model.processor
    image_embeds = model.get_image_features(**processor(images=random_images))
    text_embeds = torch.cat([model.get_text_features(**processor(text=[label])) for label in LABELS])
    scores = model.similarity(image_embeds, text_embeds)  # (4 images, 3 texts)

    with pytest.raises(ValueError, match="no gallery yet"):
        retriever("a cat")
    assert retriever.set_gallery(images=random_images, batch_size=3) is retriever
    torch.testing.assert_close(retriever.gallery_embeds, image_embeds, atol=1e-6, rtol=0)
    results = retriever(LABELS, top_k=2, batch_size=2)
    for column, result in enumerate(results):
        values, index = scores[:, column].topk(2)
        assert [r["index"] for r in result] == index.tolist()
        assert [r["image"] for r in result] == [random_images[i] for i in index.tolist()]
        torch.testing.assert_close(torch.tensor([r["score"] for r in result]), values, atol=1e-5, rtol=0)
    assert len(retriever("a cat", top_k=10)) == len(random_images)  # top_k larger than the gallery
    with pytest.raises(ValueError, match="queries must be text"):
        retriever(random_images[0])

    retriever.set_gallery(texts=LABELS)
    result = retriever(random_images[1], top_k=3)
    assert [r["text"] for r in result] == [LABELS[i] for i in scores[1].topk(3).indices.tolist()]
    torch.testing.assert_close(torch.tensor([r["score"] for r in result]), scores[1].topk(3).values, atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="exactly one of `images` or `texts`"):
        retriever.set_gallery(images=random_images, texts=LABELS)
    with pytest.raises(ValueError, match="empty gallery of texts"):
        retriever.set_gallery(texts=[])
    with pytest.raises(ValueError, match=r"texts must all be strings, got \['int'\]"):
        retriever.set_gallery(texts=["cat", 1])
    with pytest.raises(ValueError, match="top_k must be a positive int, got 0"):
        retriever(random_images[0], top_k=0)
