"""Every evaluation ranks with the model's own similarity head: its figures equal what the model's logits give.

For each registered head other than plain `cosine`, on a model whose learned parameters (if any) are random, each
path's top-1 / R@1 / mIoU is computed here by hand from `model(...)` logits (or the head itself, for patches) and
compared with the evaluation's. For the heads whose ranking of unit vectors differs from the dot product's
(`RANKING_HEADS`), the raw dot-product figure is computed too and must differ: the tests fail on an evaluation that
ignores the head.
"""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import hf_align.evaluation.metrics
from hf_align import AlignerModel, evaluate_retrieval, evaluate_segmentation, evaluate_zero_shot
from hf_align.commands.cli import main
from hf_align.evaluation import zero_shot_metrics
from hf_align.evaluation.segmentation import class_profiles, confusion_matrix, segment_tokens, segmentation_metrics
from hf_align.experiments.compare import evaluate_run
from hf_align.features import features_from_tensors
from hf_align.functional.relative_representations import relative_representation
from hf_align.functional.retrieval import chunked_retrieval_metrics, topk_similarity
from hf_align.integrations.open_clip import AlignerImageTransform
from hf_align.model.processing import ImageSizeError
from hf_align.model.templates import class_prototypes
from hf_align.similarity import SIMILARITIES
from hf_align.testing import DIGIT_NAMES, digits_dataset

HEADS = [name for name in sorted(SIMILARITIES) if name != "cosine"]
# On unit vectors `dot` is the cosine and `euclidean` a decreasing function of it (√(2 − 2 cos)): same ranking as the
# dot product. These heads rank differently, so an evaluation that scores with `images @ texts.T` reports another
# figure.
RANKING_HEADS = {"bilinear", "mlp", "manhattan", "chi_square"}
TEMPLATE = "a photo of the digit {}."


def randomise_head(model: AlignerModel, seed: int = 0) -> AlignerModel:
    """A learned head far from its initial state (bilinear starts as the dot product, mlp as a constant)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.similarity.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model.eval()


def top1(logits: torch.Tensor, labels) -> float:
    return 100.0 * (logits.argmax(1) == torch.as_tensor(labels)).float().mean().item()


def recall_at_1(logits_per_image: torch.Tensor, owner: torch.Tensor) -> tuple[float, float]:
    """(image→text, text→image) R@1 of a score matrix with no ties: the argmax is the only rank-0 candidate."""
    n_images = logits_per_image.shape[0]
    i2t = (owner[logits_per_image.argmax(1)] == torch.arange(n_images)).float().mean().item()
    t2i = (logits_per_image.argmax(0) == owner).float().mean().item()
    return 100.0 * i2t, 100.0 * t2i


def encoder_model(tiny_vit, tiny_bert, head: str, **kwargs) -> AlignerModel:
    torch.manual_seed(1)  # the aligner's initial weights: a case where every RANKING_HEADS figure moves
    model = AlignerModel.from_encoders(tiny_vit, tiny_bert, similarity=head, **(kwargs or {"projection_dim": 32}))
    return randomise_head(model)


def prompt_logits(model, vision_inputs: dict) -> torch.Tensor:
    """The model's own (n_images, n_classes) logits against one prompt per digit, from `forward`."""
    tokens = model.processor.tokenizer([TEMPLATE.format(n) for n in DIGIT_NAMES], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**vision_inputs, **tokens).logits_per_image


# ---------------------------------------------------------------------------------------------- zero-shot
@pytest.mark.parametrize("head", HEADS)
def test_zero_shot_on_images_equals_the_models_logits(head, tiny_vit, tiny_bert):
    model = encoder_model(tiny_vit, tiny_bert, head)
    data = digits_dataset(40)
    result = evaluate_zero_shot(model, model.processor, data, templates=[TEMPLATE])
    pixel_values = model.processor.image_processor(images=list(data["image"]), return_tensors="pt")["pixel_values"]
    logits = prompt_logits(model, {"pixel_values": pixel_values})
    assert result["top1"] == pytest.approx(top1(logits, data["label"]))
    if head in RANKING_HEADS:
        with torch.no_grad():
            images = model.get_image_features(pixel_values=pixel_values)
        prototypes = class_prototypes(model, model.processor, DIGIT_NAMES, [TEMPLATE])
        assert zero_shot_metrics(images @ prototypes.t(), data["label"]) != pytest.approx(dict(result))


@pytest.mark.parametrize("head", HEADS)
def test_zero_shot_on_a_feature_cache_equals_the_models_logits_and_the_metric_module(head, tiny_vit, tiny_bert):
    # a hidden layer's pooled features: the cache column `features_from_tensors` writes
    model = encoder_model(tiny_vit, tiny_bert, head, projection_dim=32, vision_layer=1, text_layer=1)
    generator = torch.Generator().manual_seed(1)
    vision = torch.randn(60, model.config.vision_hidden_size, generator=generator)
    labels = torch.randint(0, 10, (60,), generator=generator)
    layer = model.config.absolute_layer("vision")
    features = features_from_tensors(
        {layer: vision},
        {model.config.absolute_layer("text"): torch.randn(60, model.config.text_hidden_size, generator=generator)},
        extra_columns={"label": labels.tolist()},
    )
    result = evaluate_zero_shot(model, model.processor, features, class_names=DIGIT_NAMES, templates=[TEMPLATE])
    logits = prompt_logits(model, {"vision_features": vision})
    assert result["top1"] == pytest.approx(top1(logits, labels))
    # the `evaluate` module fed the model's logits gives the evaluation's figures
    module = hf_align.evaluation.metrics.load("zero_shot_accuracy").compute(
        predictions=logits.tolist(), references=labels.tolist(), ks=[1, 5]
    )
    assert module == pytest.approx(dict(result))
    if head in RANKING_HEADS:
        with torch.no_grad():
            images = model.get_image_features(vision_features=vision)
        prototypes = class_prototypes(model, model.processor, DIGIT_NAMES, [TEMPLATE])
        assert zero_shot_metrics(images @ prototypes.t(), labels) != pytest.approx(dict(result))


@pytest.mark.parametrize("head", sorted(RANKING_HEADS))
def test_benchmark_command_figure_equals_the_saved_models_logits(head, tiny_vit, tiny_bert, tmp_path, capsys):
    # a clip_benchmark-style class folder with its own one-line template file, and the saved aligner
    data = digits_dataset(40)
    for i, row in enumerate(data):
        os.makedirs(tmp_path / "digits" / DIGIT_NAMES[row["label"]], exist_ok=True)
        row["image"].save(tmp_path / "digits" / DIGIT_NAMES[row["label"]] / f"{i:02d}.png")
    (tmp_path / "digits" / "zeroshot_classification_templates.txt").write_text(TEMPLATE + "\n", encoding="utf-8")
    encoder_model(tiny_vit, tiny_bert, head).save_pretrained(str(tmp_path / "aligner"))
    argv = ["benchmark", "--model", str(tmp_path / "aligner"), "--datasets", f"digits={tmp_path / 'digits'}"]
    assert main([*argv, "--output_dir", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    with open(tmp_path / "out" / "benchmark.json", encoding="utf-8") as handle:
        reported = json.load(handle)[0]["metrics"]["top1"]
    # by hand, from the reloaded model's forward: class folders sort by name (label order), one prompt per class
    model = AlignerModel.from_pretrained(str(tmp_path / "aligner"))
    folder_names = sorted(DIGIT_NAMES)
    labels = [folder_names.index(DIGIT_NAMES[label]) for label in data["label"]]
    tokens = model.processor.tokenizer([TEMPLATE.format(n) for n in folder_names], padding=True, return_tensors="pt")
    pixel_values = model.processor.image_processor(images=list(data["image"]), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        output = model(pixel_values=pixel_values, **tokens)
    assert reported == pytest.approx(top1(output.logits_per_image, labels))
    assert reported != pytest.approx(top1(output.image_embeds @ output.text_embeds.t(), labels))


# ---------------------------------------------------------------------------------------------- retrieval
def retrieval_case(head: str):
    """48 images, 80 captions (1 to 3 per image), random features; a linear aligner with a randomised head."""
    generator = torch.Generator().manual_seed(2)
    owner = torch.cat([torch.arange(48), torch.randint(0, 48, (32,), generator=generator)]).sort().values
    images = torch.randn(48, 12, generator=generator)
    texts = torch.randn(80, 10, generator=generator)
    features = features_from_tensors({0: images[owner]}, {0: texts}, image_id=(owner * 7).tolist())
    torch.manual_seed(1)
    model = randomise_head(AlignerModel.from_feature_dims(12, 10, projection_dim=8, similarity=head))
    with torch.no_grad():
        output = model(vision_features=images, text_features=texts)
    return model, features, owner, output


@pytest.mark.parametrize("head", HEADS)
def test_retrieval_in_memory_and_chunked_equals_the_models_logits(head):
    model, features, owner, output = retrieval_case(head)
    i2t, t2i = recall_at_1(output.logits_per_image, owner)
    result = evaluate_retrieval(model, None, features)
    assert (result["image_to_text_R@1"], result["text_to_image_R@1"]) == pytest.approx((i2t, t2i))
    # the `evaluate` module on the model's logits gives the same figures
    references = [torch.nonzero(owner == i).flatten().tolist() for i in range(48)]
    module = hf_align.evaluation.metrics.load("retrieval_recall").compute(
        predictions=output.logits_per_image.tolist(), references=references, ks=[1, 5, 10]
    )
    assert module == pytest.approx(dict(result))
    # chunked, with blocks smaller than both sides: the head is called on blocks no larger than asked for
    shapes = []

    def score(image_rows, text_rows):
        shapes.append((image_rows.shape[0], text_rows.shape[0]))
        return model.similarity.score_unit_norm(image_rows, text_rows)

    images, texts = output.image_embeds, output.text_embeds
    chunked = chunked_retrieval_metrics(images, texts, owner, similarity=score, chunk_size=7, query_chunk_size=5)
    assert chunked == pytest.approx(dict(result))
    assert max(r for r, _ in shapes) == 5 and max(c for _, c in shapes) == 7
    # the chunked top-k agrees with the logits' argmax both ways
    _, best_text = topk_similarity(images, texts, k=1, chunk_size=7, query_chunk_size=5, similarity=score)
    assert torch.equal(best_text[:, 0], output.logits_per_image.argmax(1))
    _, best_image = topk_similarity(
        texts, images, k=1, chunk_size=7, query_chunk_size=5, similarity=lambda q, g: score(g, q).t()
    )
    assert torch.equal(best_image[:, 0], output.logits_per_image.argmax(0))
    if head in RANKING_HEADS:
        assert recall_at_1(images @ texts.t(), owner) != pytest.approx((i2t, t2i))


def test_chunked_retrieval_refuses_a_similarity_that_does_not_score_every_pair():
    images, texts = torch.randn(4, 3), torch.randn(6, 3)
    matched = lambda a, b: (a[:, None] * b[None]).sum(-1).diagonal()  # noqa: E731  (one score per row, not pairs)
    with pytest.raises(
        ValueError, match=r"similarity must return the \(4, 6\) matrix of every pair .* got shape \(4,\)"
    ):
        chunked_retrieval_metrics(images, texts, [0, 1, 2, 3, 0, 1], similarity=matched)
    with pytest.raises(ValueError, match=r"similarity must return the \(2, 3\) matrix .* got shape \(3, 2\)"):
        topk_similarity(images, texts, k=1, chunk_size=3, query_chunk_size=2, similarity=lambda q, g: g @ q.t())


# ---------------------------------------------------------------------------------------------- compare
@pytest.mark.parametrize("head", HEADS)
def test_compare_evaluation_equals_the_models_logits(head):
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(1)
    model = randomise_head(AlignerModel.from_feature_dims(12, 10, projection_dim=8, similarity=head))
    train_labels, test_labels = torch.randint(0, 5, (60,), generator=generator), torch.arange(40) % 5
    train_texts, test_images = torch.randn(60, 10, generator=generator), torch.randn(40, 12, generator=generator)
    test_texts = torch.randn(40, 10, generator=generator)
    train = features_from_tensors(
        {0: torch.randn(60, 12, generator=generator)}, {0: train_texts}, extra_columns={"label": train_labels.tolist()}
    )
    test = features_from_tensors({0: test_images}, {0: test_texts}, extra_columns={"label": test_labels.tolist()})
    metrics = evaluate_run(model, train, test)
    with torch.no_grad():
        output = model(vision_features=test_images, text_features=test_texts)
        class_texts = model.get_text_features(text_features=train_texts)
        # compare's prototypes: per class, the renormalised mean of its training captions' embeddings
        prototypes = F.normalize(torch.stack([class_texts[train_labels == c].mean(0) for c in range(5)]), dim=-1)
        # the model's logits against the prototypes: its head, times its temperature, as in forward
        zero_shot = model.similarity.score_unit_norm(output.image_embeds, prototypes) * model.logit_scale.exp()
    assert (metrics["image_to_text_R@1"], metrics["text_to_image_R@1"]) == pytest.approx(
        recall_at_1(output.logits_per_image, torch.arange(40))
    )
    assert metrics["zero_shot_top1"] == pytest.approx(top1(zero_shot, test_labels))
    if head in RANKING_HEADS:
        raw_recall = recall_at_1(output.image_embeds @ output.text_embeds.t(), torch.arange(40))
        raw_top1 = top1(output.image_embeds @ prototypes.t(), test_labels)
        assert (metrics["image_to_text_R@1"], metrics["text_to_image_R@1"], metrics["zero_shot_top1"]) != (
            pytest.approx((*raw_recall, raw_top1))
        )


def test_evaluating_a_selection_of_a_cache_names_the_bad_row_in_the_cache():
    generator = torch.Generator().manual_seed(4)
    vision, text = torch.randn(30, 12, generator=generator), torch.randn(30, 10, generator=generator)
    vision[23, 5] = float("nan")
    features = features_from_tensors({0: vision}, {0: text}, extra_columns={"label": [i % 3 for i in range(30)]})
    test = features.select([3, 9, 23, 27])  # cache row 23 is row 2 of the selection
    model = AlignerModel.from_feature_dims(12, 10, projection_dim=8, similarity="bilinear")
    named = r"rows \[2\] of the features given \(rows \[23\] of the cache they were selected from\)"
    with pytest.raises(ValueError, match=r"NaN or Inf in vision_features of 1 row\(s\), e\.g\. " + named):
        evaluate_run(model, features.select(range(3)), test)
    with pytest.raises(ValueError, match=named):
        evaluate_retrieval(model, None, test.select([0, 1, 2]))  # a selection of a selection: still cache row 23


# ---------------------------------------------------------------------------------------------- segmentation
CLASSES = ["cat", "dog", "car"]


def noise_images(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("head", HEADS)
def test_segmentation_miou_is_scored_by_the_head(head, tiny_vit, tiny_bert):
    import datasets

    model = encoder_model(tiny_vit, tiny_bert, head, method="token_relative", num_anchors=16)
    images = noise_images(4, seed=4)
    rng = np.random.default_rng(5)
    masks = [rng.integers(0, 3, (32, 32)).astype(np.uint8) for _ in images]
    dataset = datasets.Dataset.from_dict({"image": images, "mask": [Image.fromarray(m) for m in masks]})
    result = evaluate_segmentation(model, None, dataset, CLASSES, templates=["a {}."], batch_size=3)
    # by hand: PAL's patch embeddings S_pa (cosines to the vision anchors, images already at the 32x32 input), scored
    # against the class profiles by the head on unit-norm rows (the plain product S_pa · S_ac for `dot`)
    profiles = class_profiles(model, model.processor, CLASSES, ["a {}."])
    with torch.no_grad():
        tokens, _ = model.tapped_vision_features(model.processor(images=images)["pixel_values"])
        s_pa = relative_representation(tokens[:, 1:], model.aligner.vision_anchors)  # (4, 16, K), CLS dropped
        flat = s_pa.reshape(-1, s_pa.shape[-1])
        if head == "dot":
            scores = flat @ profiles.t()
        else:
            scores = model.similarity.score_unit_norm(F.normalize(flat, dim=-1), profiles)
        raw = (flat @ profiles.t()).reshape(4, 16, 3)
    grid = lambda s: F.interpolate(s.transpose(1, 2).reshape(4, 3, 4, 4), size=(32, 32), mode="bilinear")  # noqa: E731
    maps = grid(scores.reshape(4, 16, 3)).argmax(1)
    truth = torch.as_tensor(np.stack(masks)).long()
    expected = segmentation_metrics(confusion_matrix(maps, truth, 3), CLASSES)
    assert result["mIoU"] == pytest.approx(expected["mIoU"])
    assert result["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"])
    with torch.no_grad():
        token_maps = segment_tokens(model, tokens, profiles, output_size=(32, 32))
    assert torch.equal(token_maps, maps)
    if head in RANKING_HEADS:
        assert not torch.equal(grid(raw).argmax(1), maps)


# ---------------------------------------------------------------------------------------------- open_clip preprocess
def test_open_clip_preprocess_refuses_a_strip_image(tiny_vit, tiny_bert):
    model = AlignerModel.from_encoders(tiny_vit, tiny_bert, projection_dim=8)
    preprocess = AlignerImageTransform(model.processor.image_processor)
    assert preprocess(Image.new("RGB", (40, 30))).shape == (3, 32, 32)
    with pytest.raises(ImageSizeError, match=r"preprocess image: a 3000x2 px image has an aspect ratio of 1500:1"):
        preprocess(Image.new("RGB", (3000, 2)))
