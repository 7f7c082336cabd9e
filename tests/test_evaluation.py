"""Retrieval and zero-shot metrics against hand-built score matrices, and the dataset-level protocols."""

import pytest
import torch

from hf_align import AlignerModel, evaluate_retrieval, evaluate_zero_shot
from hf_align.evaluation import EvaluationResult, retrieval_metrics, zero_shot_metrics
from hf_align.features import features_from_tensors
from hf_align.model.configuration import TASK_RETRIEVAL, TASK_ZERO_SHOT
from hf_align.model.templates import class_prototypes, embed_texts
from hf_align.testing import DIGIT_NAMES, digits_dataset


def test_retrieval_with_several_captions_per_image_by_hand():
    # 3 images, 5 captions: captions 0,1 -> image 0; 2,3 -> image 1; 4 -> image 2
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.8, 0.0, 0.2],
            [0.5, 0.2, 0.3, 0.6, 0.1],
            [0.1, 0.7, 0.2, 0.1, 0.4],
        ]
    )
    owner = [0, 0, 1, 1, 2]
    m = retrieval_metrics(scores, owner, ks=(1, 2))
    # image->text: image 0's best caption (0.9) tops its row -> hit@1; image 1's best caption (caption 3, 0.6)
    # tops its row -> hit@1; image 2's caption (0.4) is beaten by caption 1 (0.7) -> rank 2.
    assert m["image_to_text_R@1"] == pytest.approx(200 / 3)
    assert m["image_to_text_R@2"] == pytest.approx(100.0)
    # text->image: caption0 col [.9,.5,.1] own 0 -> hit; caption1 [.1,.2,.7] own 0 -> rank 3; caption2 [.8,.3,.2]
    # own 1 -> rank 2; caption3 [0,.6,.1] own 1 -> hit; caption4 [.2,.1,.4] own 2 -> hit
    assert m["text_to_image_R@1"] == pytest.approx(60.0)
    assert m["text_to_image_R@2"] == pytest.approx(80.0)
    assert m["mean_R@1"] == pytest.approx((200 / 3 + 60) / 2)


def test_retrieval_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"text_image_index must have shape \(3,\) \(one image per text\), got \(2,\)"):
        retrieval_metrics(torch.zeros(2, 3), [0, 1])
    with pytest.raises(ValueError, match=r"text_image_index values must lie in \[0, 2\), got \[0, 5\]"):
        retrieval_metrics(torch.zeros(2, 2), [0, 5])


def test_zero_shot_metrics_by_hand():
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 2.0], [1.0, 3.0, 2.0], [2.0, 1.0, 0.0]])
    labels = [0, 1, 1, 2]
    m = zero_shot_metrics(logits, labels, ks=(1, 2))
    assert m["top1"] == pytest.approx(50.0)  # rows 0 and 2 right
    assert m["top2"] == pytest.approx(75.0)  # row 1: label 1 is 2nd; row 3: label 2 is last
    # per-class recall: class 0 1/1, class 1 1/2, class 2 0/1 -> mean 50%
    assert m["mean_per_class_recall"] == pytest.approx(50.0)


def test_evaluate_retrieval_on_a_feature_cache_uses_image_ids():
    # identity aligner on 2-d features: pooled image i = e_i, captions point at their image
    vision = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.1], [0.9, 0.0], [0.1, 1.0]])
    features = features_from_tensors({0: vision}, {0: text}, image_id=[7, 7, 9])
    model = AlignerModel.from_feature_dims(2, 2, projection_dim=2)
    with torch.no_grad():
        model.aligner.vision_head.weight.copy_(torch.eye(2))
        model.aligner.text_head.weight.copy_(torch.eye(2))
    m = evaluate_retrieval(model, dataset=features, dataset_name="pairs")
    assert m["image_to_text_R@1"] == 100.0 and m["text_to_image_R@1"] == 100.0
    # the result carries what a card records, and nothing was written into the model
    assert isinstance(m, EvaluationResult) and m.card_metrics == dict(m)
    assert (m.task, m.dataset, m.dataset_name, m.dataset_split, m.num_samples) == (
        TASK_RETRIEVAL,
        features,
        "pairs",
        None,
        2,
    )
    assert m.details == "3 captions of 2 images, every image against every caption"
    assert model.config.training_summary == {}


def test_zero_shot_on_raw_images_and_class_name_checks(tiny_vit, minilm):
    model = AlignerModel.from_encoders(tiny_vit, minilm, projection_dim=8)
    data = digits_dataset(20)
    m = evaluate_zero_shot(model, model.processor, data, templates=["a handwritten digit {}"])
    assert set(m) == {"top1", "top5", "mean_per_class_recall"} and 0 <= m["top1"] <= 100
    assert (m.task, m.num_samples, m.details) == (
        TASK_ZERO_SHOT,
        20,
        "20 images, 10 classes, 1 prompt template per class",
    )
    assert model.config.training_summary == {}
    templates = ["a {}", "the digit {}"]
    prototypes = class_prototypes(model, model.processor, DIGIT_NAMES[:3], templates)
    # per class: the mean of its normalised prompt embeddings (normalised by get_text_features), renormalised
    prompts = embed_texts(model, model.processor, [t.format(n) for n in DIGIT_NAMES[:3] for t in templates])
    expected = torch.nn.functional.normalize(prompts.view(3, 2, -1).mean(1), dim=-1)
    torch.testing.assert_close(prototypes, expected)
    torch.testing.assert_close(prototypes.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="class_names is empty"):
        class_prototypes(model, model.processor, [], None)
    with pytest.raises(ValueError, match=r"class_names has duplicates \['one'\]"):
        class_prototypes(model, model.processor, ["one", "two", "one"], None)
    with pytest.raises(ValueError, match=r"templates\[0\]='no placeholder' must hold exactly one bare '\{\}'"):
        class_prototypes(model, model.processor, ["one"], ["no placeholder"])


def test_ties_count_against_the_query():
    # a collapsed model scores every pair alike: it must not get perfect recall
    m = retrieval_metrics(torch.zeros(4, 4), [0, 1, 2, 3], ks=(1, 4))
    assert m["image_to_text_R@1"] == 0.0 and m["text_to_image_R@1"] == 0.0
    assert m["mean_R@4"] == 100.0
    # two captions of one image tied with each other are both positives: no penalty
    m = retrieval_metrics(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), [0, 0, 1], ks=(1,))
    assert m["image_to_text_R@1"] == 100.0 and m["text_to_image_R@1"] == 100.0
