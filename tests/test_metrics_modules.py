"""The `evaluate` modules shipped in hf_align/metrics: offline loading, hand-checked values, same numbers as the
library's own evaluation (one implementation), and evaluate's import scanner on each module file."""

import evaluate
import pytest
import torch
from evaluate.loading import get_imports

import hf_align
import hf_align.evaluation.metrics
from hf_align.evaluation import evaluate_retrieval, retrieval_metrics
from hf_align.evaluation.metrics.retrieval_recall.retrieval_recall import text_owners
from hf_align.evaluation.zero_shot_retrieval import embed_feature_cache
from hf_align.testing import make_paired_task

# 3 images x 4 texts; image 0 has texts 0 and 3, image 1 text 1, image 2 text 2.
SCORES = [
    [0.9, 0.2, 0.8, 0.1],
    [0.8, 0.7, 0.6, 0.3],
    [0.4, 0.1, 0.95, 0.2],
]
CAPTIONS_OF = [[0, 3], [1], [2]]


@pytest.fixture(scope="module")
def recall():
    return hf_align.evaluation.metrics.load("retrieval_recall")


@pytest.fixture(scope="module")
def accuracy():
    return hf_align.evaluation.metrics.load("zero_shot_accuracy")


def test_retrieval_recall_hand_checked(recall):
    # image->text: image 0's best caption (0.9) tops its row, image 1's caption (0.7) is beaten by text 0 (0.8),
    # image 2's caption (0.95) tops its row -> R@1 = 2/3, R@2 = 3/3.
    # text->image: texts 0, 1, 2 rank their image first; text 3 (0.1) is beaten by images 1 (0.3) and 2 (0.2)
    # -> R@1 = R@2 = 3/4.
    out = recall.compute(predictions=SCORES, references=CAPTIONS_OF, ks=[1, 2])
    assert out["image_to_text_R@1"] == pytest.approx(200 / 3, abs=1e-4)
    assert out["image_to_text_R@2"] == pytest.approx(100.0)
    assert out["text_to_image_R@1"] == pytest.approx(75.0)
    assert out["text_to_image_R@2"] == pytest.approx(75.0)
    assert out["mean_R@1"] == pytest.approx((200 / 3 + 75) / 2, abs=1e-4)
    assert out["mean_R@2"] == pytest.approx(87.5)


def test_retrieval_recall_batches_add_up(recall):
    for row, captions in zip(SCORES, CAPTIONS_OF):
        recall.add_batch(predictions=[row], references=[captions])
    assert recall.compute(ks=[1])["text_to_image_R@1"] == pytest.approx(75.0)


def test_zero_shot_accuracy_hand_checked(accuracy):
    # argmax: 1, 0, 2, 0 against labels 1, 0, 1, 2 -> top-1 2/4; top-2 adds image 2 (its 2nd class is 1) -> 3/4;
    # per-class recall: class 0 1/1, class 1 1/2, class 2 0/1 -> mean 1/2.
    predictions = [[0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]]
    out = accuracy.compute(predictions=predictions, references=[1, 0, 1, 2], ks=[1, 2])
    assert out == pytest.approx({"top1": 50.0, "top2": 75.0, "mean_per_class_recall": 50.0})


def test_segmentation_miou_hand_checked():
    miou = hf_align.evaluation.metrics.load("segmentation_miou")
    # classes sky, road, car + a "background" prompt (3) that is predicted but never a reference class
    predictions = [[[0, 1, 1], [2, 3, 1]], [[1, 1]]]
    references = [[[0, 0, 1], [2, 2, 255]], [[1, 1]]]
    out = miou.compute(
        predictions=predictions,
        references=references,
        num_labels=4,
        class_names=["sky", "road", "car", "bg"],
        num_scored=3,
    )
    # confusion over the 7 scored pixels (rows = reference): sky -> sky 1, road 1; road -> road 3; car -> car 1, bg 1
    # IoU sky 1/(1+2-1) = 50, road 3/(4+3-3) = 75, car 1/(1+2-1) = 50; pixel accuracy 5/7
    assert out["per_class_iou"] == pytest.approx({"sky": 50.0, "road": 75.0, "car": 50.0})
    assert out["mIoU"] == pytest.approx(175 / 3)
    assert out["pixel_accuracy"] == pytest.approx(500 / 7)


def test_segmentation_shapes_and_labels_checked():
    miou = hf_align.evaluation.metrics.load("segmentation_miou")
    with pytest.raises(
        ValueError, match=r"image 0: prediction of shape \(1, 2\) and reference of shape \(2, 1\) differ"
    ):
        miou.compute(predictions=[[[0, 1]]], references=[[[0], [1]]], num_labels=2)
    with pytest.raises(ValueError, match=r"num_labels must be a positive int \(the number of classes\), got 0"):
        miou.compute(predictions=[[[0]]], references=[[[0]]], num_labels=0)
    with pytest.raises(ValueError, match=r"mask labels \[5\] are outside the 2 classes"):
        miou.compute(predictions=[[[0]]], references=[[[5]]], num_labels=2)


def test_module_numbers_equal_the_recorded_evaluation(recall):
    """The number recorded on the card from evaluate_retrieval's result is the number the shipped module computes."""
    task = make_paired_task(n=60, vision_dim=12, text_dim=10, seed=3)
    features = task.to_features()
    model = hf_align.AlignerModel.from_feature_dims(12, 10, projection_dim=6)
    returned = evaluate_retrieval(model, dataset=features, dataset_name="synthetic", dataset_split="test")
    images, texts = embed_feature_cache(model, features)
    scores = model.similarity(images, texts)
    through_module = recall.compute(predictions=scores.tolist(), references=[[i] for i in range(60)])
    model.model_card_data.add_evaluation(returned)
    recorded = model.config.training_summary["evaluations"][-1]["metrics"]
    assert recorded == returned
    assert through_module == pytest.approx(recorded, abs=1e-4)  # float32 round trip through Arrow
    assert recorded == retrieval_metrics(scores, torch.arange(60))


def test_shipped_modules_load_by_path_with_evaluate(tmp_path):
    module = evaluate.load(hf_align.evaluation.metrics.module_path("zero_shot_accuracy"), cache_dir=str(tmp_path))
    assert module.compute(predictions=[[0.2, 0.8]], references=[1], ks=[1])["top1"] == 100.0


@pytest.mark.parametrize("name", hf_align.evaluation.metrics.METRIC_NAMES)
def test_import_scanner_sees_one_library_per_import(name):
    # `import datasets, evaluate` on one line would be read as a single library "datasets," by evaluate's scanner.
    imports = {(kind, library) for kind, library, _, _ in get_imports(hf_align.evaluation.metrics.module_path(name))}
    assert {("library", "datasets"), ("library", "evaluate"), ("library", "hf_align")} <= imports
    assert all("," not in library for _, library in imports)


def test_unknown_metric_name():
    with pytest.raises(ValueError, match=r"unknown hf_align metric 'accuracy'; shipped metrics: \['retrieval_recall'"):
        hf_align.evaluation.metrics.load("accuracy")


@pytest.mark.parametrize(
    "references, message",
    [
        ([[0], [1], [2]], r"texts \[3\] are listed under no image"),
        ([[0, 3], [1, 3], [2]], r"text 3 is listed under images 0 and 1"),
        ([[0, 4], [1], [2]], r"references\[0\] names text 4, outside \[0, 4\)"),
    ],
)
def test_retrieval_references_checked(references, message):
    with pytest.raises(ValueError, match=message):
        text_owners(references, 4)


def test_ragged_score_rows_rejected(recall):
    with pytest.raises(ValueError, match=r"all rows as long as the number of texts; got rows of lengths \[1, 2\]"):
        recall.compute(predictions=[[0.1, 0.2], [0.3]], references=[[0], [1]])


def test_ragged_class_scores_rejected(accuracy):
    with pytest.raises(ValueError, match=r"score for each of the C classes; got rows of lengths \[2, 3\]"):
        accuracy.compute(predictions=[[0.1, 0.2], [0.3, 0.1, 0.2]], references=[0, 1])
