"""Zero-shot segmentation: metrics against a hand-computed confusion matrix, planted per-patch classes on the synthetic
token task, the image path (every tiny vision tower kind, `AlignerModel.segment`, overlay), and bad input. CPU, offline.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_token_relative import fit

import hf_align
import hf_align.evaluation.segmentation
from hf_align import AlignerModel
from hf_align.evaluation.segmentation import (
    ADE150_CLASSES,
    CONTEXT59_CLASSES,
    VOC_CLASSES,
    confusion_matrix,
    evaluate_segmentation,
    segmentation_metrics,
    segmentation_preset,
)
from hf_align.model.configuration import TASK_SEGMENTATION
from hf_align.model.segmentation import (
    class_profiles,
    overlay_segmentation,
    palette,
    patch_grid,
    segment_tokens,
    segmentation_logits,
)
from hf_align.testing import make_paired_task

LAYER = 2
CLASSES = ["cat", "dog", "car"]


# ---------------------------------------------------------------------------------------------- metrics
def test_miou_matches_a_hand_computed_confusion_matrix():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    prediction = torch.tensor([[0, 1, 1], [1, 0, 2]])
    # (gt, pred) over the 5 labelled pixels: (0,0) (0,1) (1,1) (1,1) (2,0); the ignored pixel never counts
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    confusion = confusion_matrix(prediction, target, num_classes=3)
    assert torch.equal(confusion, expected)
    metrics = segmentation_metrics(confusion, CLASSES)
    # IoU = TP / (gt + pred - TP): cat 1/(2+2-1), dog 2/(2+3-2), car 0/(1+0-0)
    assert metrics["per_class_iou"] == pytest.approx({"cat": 100 / 3, "dog": 200 / 3, "car": 0.0})
    assert metrics["mIoU"] == pytest.approx(100 / 3)
    assert metrics["pixel_accuracy"] == pytest.approx(60.0)
    # a class neither labelled nor predicted is skipped, not averaged in as 0
    four = segmentation_metrics(confusion_matrix(prediction, target, num_classes=4), CLASSES + ["bird"])
    assert four["mIoU"] == pytest.approx(100 / 3) and "bird" not in four["per_class_iou"]
    # a class predicted but absent from the ground truth scores 0 (mmseg's convention)
    predicted_bird = prediction.clone()
    predicted_bird[0, 0] = 3
    five = segmentation_metrics(confusion_matrix(predicted_bird, target, num_classes=4), CLASSES + ["bird"])
    assert five["per_class_iou"]["bird"] == 0.0
    assert five["mIoU"] == pytest.approx((0 / 3 + 200 / 3 + 0 + 0) / 4)
    # only the first num_scored classes enter the mean (a background prompt is not a class of the masks)
    scored = segmentation_metrics(confusion_matrix(predicted_bird, target, num_classes=4), CLASSES, num_scored=3)
    assert scored["mIoU"] == pytest.approx((0 / 3 + 200 / 3 + 0) / 3) and scored["pixel_accuracy"] == pytest.approx(
        40.0
    )


def test_metric_errors():
    with pytest.raises(
        ValueError, match=r"mask labels \[7\] are outside the 3 classes \[0, 3\) and are not ignore_index=255"
    ):
        confusion_matrix(torch.zeros(2, 2), torch.tensor([[0, 7], [1, 255]]), num_classes=3)
    with pytest.raises(ValueError, match=r"no labelled pixel to score"):
        segmentation_metrics(confusion_matrix(torch.zeros(4), torch.full((4,), 255), num_classes=3))
    with pytest.raises(ValueError, match=r"predictions and targets differ in size: 4 vs 6 pixels"):
        confusion_matrix(torch.zeros(4), torch.zeros(6), num_classes=3)


# ---------------------------------------------------------------------------------------------- presets
def label_map(scores: torch.Tensor) -> torch.Tensor:
    """The argmax over classes of a hand-built (C, H, W) score map, as the segmenter takes it."""
    return scores.argmax(0)


def one_hot_scores(labels: list[int], num_classes: int) -> torch.Tensor:
    """(C, 1, W) scores peaking at the given label of each pixel (2 above a ramp from 1 down to 0 over the classes)."""
    ramp = torch.linspace(1.0, 0.0, num_classes)[:, None]
    scores = (ramp + 2.0 * F.one_hot(torch.tensor(labels), num_classes).T)[:, None, :]
    assert label_map(scores)[0].tolist() == labels
    return scores


def test_voc_presets_count_background_pixels_and_differ_only_in_the_mean():
    voc20, voc21 = segmentation_preset("voc20"), segmentation_preset("voc21")
    assert voc20.class_names == voc21.class_names == ("background", *VOC_CLASSES) and len(VOC_CLASSES) == 20
    assert voc20.class_names[11] == "dining table" and voc20.class_names[20] == "tv monitor"  # PAL's rewrites
    # 8 pixels: background, aeroplane (1), bicycle (2), bird (3); the last one is void (255)
    mask = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 255]])
    prediction = label_map(one_hot_scores([0, 1, 1, 1, 2, 0, 3, 2], 21))
    confusion = voc20.confusion(prediction, mask)
    assert torch.equal(voc21.confusion(prediction, mask), confusion) and confusion.sum() == 7  # void not counted
    # IoU: background 1/(2+2-1), aeroplane 2/(2+3-2) (a background pixel predicted "aeroplane" is its false positive),
    # bicycle 1/(2+1-1), bird 1/1; classes neither labelled nor predicted are skipped
    iou = {"background": 100 / 3, "aeroplane": 200 / 3, "bicycle": 50.0, "bird": 100.0}
    m20, m21 = voc20.metrics(confusion), voc21.metrics(confusion)
    assert m20["per_class_iou"] == pytest.approx(iou) and m21["per_class_iou"] == pytest.approx(iou)
    assert m20["mIoU"] == pytest.approx((200 / 3 + 50 + 100) / 3)  # background's IoU left out of the mean
    assert m21["mIoU"] == pytest.approx((100 / 3 + 200 / 3 + 50 + 100) / 4)
    assert m20["pixel_accuracy"] == pytest.approx(500 / 7)
    # a protocol that ignores background pixels would score aeroplane 100: PAL's VOC20 figure is not that one
    ignoring = segmentation_metrics(confusion_matrix(prediction, mask.masked_fill(mask == 0, 255), 21))
    assert ignoring["per_class_iou"]["1"] == 100.0


def test_context_presets_follow_the_59_class_label_order():
    context59, context60 = segmentation_preset("context59"), segmentation_preset("context60")
    assert len(CONTEXT59_CLASSES) == len(set(CONTEXT59_CLASSES)) == 59
    assert context59.class_names == ("background", *CONTEXT59_CLASSES)
    assert (CONTEXT59_CLASSES[0], CONTEXT59_CLASSES[14], CONTEXT59_CLASSES[58]) == ("aeroplane", "cat", "wood")
    mask = torch.tensor([[0, 0, 15, 59, 255]])  # background, background, cat, wood, void
    prediction = label_map(one_hot_scores([15, 0, 15, 59, 3], 60))
    confusion = context59.confusion(prediction, mask)
    # background 1/(2+1-1) = 50, cat 1/(1+2-1) = 50, wood 100
    assert context59.metrics(confusion)["mIoU"] == pytest.approx((50 + 100) / 2)
    assert context60.metrics(confusion)["mIoU"] == pytest.approx((50 + 50 + 100) / 3)


def test_ade150_default_shifts_labels_and_ignores_unlabelled_pixels():
    ade = segmentation_preset("ade150")
    assert ade.class_names == ADE150_CLASSES and len(set(ADE150_CLASSES)) == 150
    assert (ADE150_CLASSES[0], ADE150_CLASSES[7], ADE150_CLASSES[149]) == ("wall", "bed", "flag")
    assert "not comparable with PAL's ADE20K figure" in ade.background_rule
    mask = torch.tensor([[0, 1, 2, 150, 3]])  # unlabelled, wall, building, flag, sky
    prediction = label_map(one_hot_scores([5, 0, 1, 149, 0], 150))
    assert torch.equal(ade.scored_labels(mask), torch.tensor([[-1, 0, 1, 149, 2]]))
    metrics = ade.metrics(ade.confusion(prediction, mask))
    # wall 1/(1+2-1) = 50, building 100, flag 100, sky 0 (labelled, never predicted)
    assert metrics["per_class_iou"] == pytest.approx({"wall": 50.0, "building": 100.0, "flag": 100.0, "sky": 0.0})
    assert metrics["mIoU"] == pytest.approx(62.5)


def test_pal_ade_protocol_puts_the_dummy_background_iou_of_zero_into_the_mean():
    pal = segmentation_preset("ade150", pal_ade_protocol=True)
    assert pal.class_names == ("background", *ADE150_CLASSES) and pal.mean_excludes == ()
    mask = torch.tensor([[0, 1, 2, 150, 3]])  # raw ids are the class indices; 0 (unlabelled) is ignored
    # the background prompt wins the wall pixel: background IoU 0/(0+1-0) = 0 enters the mean, wall gets 0 too
    wins = pal.metrics(pal.confusion(label_map(one_hot_scores([7, 0, 2, 150, 3], 151)), mask))
    assert wins["per_class_iou"] == pytest.approx(
        {"background": 0.0, "wall": 0.0, "building": 100.0, "sky": 100.0, "flag": 100.0}
    )
    assert wins["mIoU"] == pytest.approx(60.0)
    # when it wins no labelled pixel it has no ground truth and no prediction: skipped, not a 0
    loses = pal.metrics(pal.confusion(label_map(one_hot_scores([0, 1, 2, 150, 3], 151)), mask))
    assert "background" not in loses["per_class_iou"] and loses["mIoU"] == 100.0
    # the same predictions under the default protocol (no background prompt, labels shifted) score 100 on 4 classes
    ade = segmentation_preset("ade150")
    shifted = ade.metrics(ade.confusion(label_map(one_hot_scores([9, 0, 1, 149, 2], 150)), mask))
    assert shifted["mIoU"] == 100.0 and len(shifted["per_class_iou"]) == 4


def test_preset_errors():
    with pytest.raises(ValueError, match=r"preset must be one of \['ade150', 'context59', 'context60', 'voc20', "):
        segmentation_preset("voc2012")
    with pytest.raises(ValueError, match=r"pal_ade_protocol=True reproduces PAL's ADE20K protocol: it needs "):
        segmentation_preset("voc20", pal_ade_protocol=True)
    message = r"mask labels \[151\] are not labels of preset 'ade150': it reads classes 1\.\.150 and ignores 0"
    with pytest.raises(ValueError, match=message):
        segmentation_preset("ade150").scored_labels(torch.tensor([[0, 151, 3]]))
    with pytest.raises(ValueError, match=r"mean_excludes must hold class indices in \[0, 3\), got \[3\]"):
        segmentation_metrics(torch.eye(3), mean_excludes=[3])


def test_inference_names_stay_importable_from_segmentation():
    import hf_align.model.segmentation as inference

    for name in ("segment_tokens", "segment_images", "overlay_segmentation", "class_profiles", "segmentation_logits"):
        assert getattr(hf_align.evaluation.segmentation, name) is getattr(inference, name)
    assert (
        hf_align.model.segment_tokens is segment_tokens and hf_align.model.overlay_segmentation is overlay_segmentation
    )


def test_patch_grid():
    assert patch_grid(257, 1) == (16, 16)
    assert patch_grid(16, 0) == (4, 4)
    with pytest.raises(
        ValueError, match=r"cannot lay 15 vision tokens \(0 prefix token\(s\) dropped, 15 left\) on a square"
    ):
        patch_grid(15, 0)


# ---------------------------------------------------------------------------------------------- synthetic tokens
@pytest.fixture(scope="module")
def planted():
    """token_relative trained on the synthetic token task; class profiles from the training captions of each class."""
    task = make_paired_task(n=1000, tokens=True, seed=0)
    train_part, held_out = task.split(500)
    model = fit(AlignerModel.from_feature_dims(64, 48, method="token_relative", num_anchors=64), train_part)
    with torch.no_grad():
        texts = model.get_text_features(text_features=train_part.text_tokens[LAYER], text_mask=train_part.text_mask)
    n_classes = task.centers.shape[0]
    profiles = F.normalize(torch.stack([texts[train_part.labels == c].mean(0) for c in range(n_classes)]), dim=-1)
    return model, profiles, held_out


def test_segmentation_of_planted_patch_classes(planted):
    model, profiles, held_out = planted
    # each held-out image: 16 patches (no CLS) on a 4x4 grid, about half planted with another cluster
    with torch.no_grad():
        maps = segment_tokens(model, held_out.vision_tokens[LAYER], profiles, num_prefix_tokens=0)
    assert maps.shape == (500, 4, 4) and maps.dtype == torch.long
    truth = held_out.patch_labels.view(-1, 4, 4)
    metrics = segmentation_metrics(confusion_matrix(maps, truth, num_classes=10))
    # measured 97 % (CAP); chance is ~10 %
    assert metrics["mIoU"] > 85.0, metrics
    # the same anchors untrained (random directions) are far worse: the score comes from training
    untrained = AlignerModel.from_feature_dims(64, 48, method="token_relative", num_anchors=64)
    with torch.no_grad():
        texts = untrained.get_text_features(text_features=held_out.text_tokens[LAYER], text_mask=held_out.text_mask)
        random_profiles = F.normalize(torch.stack([texts[held_out.labels == c].mean(0) for c in range(10)]), dim=-1)
        random_maps = segment_tokens(untrained, held_out.vision_tokens[LAYER], random_profiles, num_prefix_tokens=0)
    assert segmentation_metrics(confusion_matrix(random_maps, truth, 10))["mIoU"] < metrics["mIoU"] - 30


def test_scores_are_patch_anchor_cosines_times_class_profiles(planted):
    model, profiles, held_out = planted
    tokens = held_out.vision_tokens[LAYER][:3]
    with torch.no_grad():
        logits = segmentation_logits(model, tokens, profiles, num_prefix_tokens=0)  # (3, C, 4, 4)
        s_pa = hf_align.functional.relative_representation(
            tokens, model.aligner.vision_anchors
        )  # (3, 16, K), not renormalised
    expected = (s_pa @ profiles.t()).transpose(1, 2).reshape(3, 10, 4, 4)
    torch.testing.assert_close(logits, expected)
    # a leading CLS token is dropped by default (the config says the encoder has one)
    with_cls = torch.cat([torch.randn(3, 1, 64), tokens], dim=1)
    torch.testing.assert_close(segmentation_logits(model, with_cls, profiles), expected)
    # bilinear upsampling (half-pixel centres): 4 -> 12 puts patch (k, j)'s centre exactly on pixel (3k+1, 3j+1)
    big = segmentation_logits(model, tokens, profiles, output_size=(12, 12), num_prefix_tokens=0)
    torch.testing.assert_close(big[:, :, 1::3, 1::3], logits)
    assert torch.equal(
        segment_tokens(model, tokens, profiles, output_size=(12, 12), num_prefix_tokens=0), big.argmax(1)
    )
    with pytest.raises(ValueError, match=r"cannot lay 17 vision tokens"):
        segment_tokens(model, with_cls, profiles, num_prefix_tokens=0)


# ---------------------------------------------------------------------------------------------- images
def random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="module")
def vit_model(tiny_vit, tiny_bert):
    return AlignerModel.from_encoders(tiny_vit, tiny_bert, method="token_relative", num_anchors=16)


@pytest.mark.parametrize("kind", ["vit", "dinov2", "clip", "convnext"])
def test_segment_gives_one_label_map_per_image_at_its_size(kind, tiny_vision_encoders, tiny_bert):
    model = AlignerModel.from_encoders(tiny_vision_encoders[kind], tiny_bert, method="token_relative", num_anchors=16)
    images = random_images([(40, 50), (32, 32), (17, 61)])
    maps = model.segment(images, CLASSES, templates=["a photo of a {}."])
    assert [tuple(m.shape) for m in maps] == [(40, 50), (32, 32), (17, 61)]
    assert all(m.dtype == torch.long and m.min() >= 0 and m.max() < 3 for m in maps)
    single = model.segment(images[0], CLASSES, templates=["a photo of a {}."])
    assert torch.equal(single, maps[0])


def test_segment_equals_the_token_path(vit_model):
    """Images already at the encoder's 32x32 input: segment() == segment_tokens on the tapped tokens."""
    model = vit_model
    images = random_images([(32, 32), (32, 32)], seed=1)
    templates = ["a photo of a {}.", "a {}."]
    profiles = class_profiles(model, model.processor, CLASSES, templates)
    with torch.no_grad():
        pixel_values = model.processor(images=images)["pixel_values"]
        tokens, _ = model.tapped_vision_features(pixel_values)  # the tapped layer's tokens: last_hidden_state
        expected = segment_tokens(model, tokens, profiles, output_size=(32, 32))  # 17 tokens: CLS + 4x4 patches
    maps = model.segment(images, CLASSES, templates=templates)
    assert torch.equal(torch.stack(maps), expected)
    # a background prompt is one more class, label len(CLASSES)
    with_background = class_profiles(model, model.processor, CLASSES, templates, background="background")
    assert with_background.shape == (4, 16)


def test_evaluate_segmentation_agrees_with_segment(vit_model):
    import datasets

    model = vit_model
    images = random_images([(40, 50), (24, 24), (33, 20)], seed=2)
    rng = np.random.default_rng(3)
    masks = [rng.integers(0, 3, (img.size[1], img.size[0])).astype(np.uint8) for img in images]
    masks[0][:5] = 255  # ignored pixels
    dataset = datasets.Dataset.from_dict({"image": images, "mask": [Image.fromarray(m) for m in masks]})
    metrics = evaluate_segmentation(model, None, dataset, CLASSES, templates=["a {}."], batch_size=2)
    maps = model.segment(images, CLASSES, templates=["a {}."])
    confusion = sum(confusion_matrix(p, torch.as_tensor(m).long(), 3) for p, m in zip(maps, masks))
    expected = segmentation_metrics(confusion, CLASSES)
    assert metrics["mIoU"] == pytest.approx(expected["mIoU"])
    assert metrics["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"])
    assert metrics["num_images"] == 3 and set(metrics["per_class_iou"]) <= set(CLASSES)
    assert hf_align.evaluate_segmentation is evaluate_segmentation
    # with a background prompt: its pixels count as wrong, it gets no IoU of its own
    background = evaluate_segmentation(
        model, None, dataset, CLASSES, templates=["a {}."], background="background", dataset_name="noise"
    )
    assert "background" not in background["per_class_iou"]
    # the card gets mIoU and pixel accuracy only, once the caller records the run; evaluating wrote nothing
    assert model.config.training_summary == {}
    assert background.card_metrics == {"mIoU": background["mIoU"], "pixel_accuracy": background["pixel_accuracy"]}
    assert model.model_card_data.add_evaluation(background) == {
        "task": TASK_SEGMENTATION,
        "dataset": {"name": "noise", "num_rows": 3},
        "metrics": background.card_metrics,
        "details": "3 classes + 'background' prompt",
    }
    model.config.training_summary = {}  # the module's shared model stays unrecorded


def test_evaluate_segmentation_with_a_preset(vit_model):
    import datasets

    model = vit_model
    images = random_images([(30, 40), (24, 24)], seed=5)
    rng = np.random.default_rng(6)
    masks = [rng.choice([0, 1, 5, 15, 255], size=(img.size[1], img.size[0])).astype(np.uint8) for img in images]
    dataset = datasets.Dataset.from_dict({"image": images, "mask": [Image.fromarray(m) for m in masks]})
    voc20 = segmentation_preset("voc20")
    result = evaluate_segmentation(model, None, dataset, templates=["a {}."], preset="voc20", dataset_name="voc")
    maps = model.segment(images, list(voc20.class_names), templates=["a {}."])
    expected = voc20.metrics(sum(voc20.confusion(p, torch.as_tensor(m)) for p, m in zip(maps, masks)))
    assert result["mIoU"] == pytest.approx(expected["mIoU"])
    assert result["per_class_iou"] == pytest.approx(expected["per_class_iou"])
    assert result["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"])
    assert result.details.startswith('preset `voc20`: a "background" prompt (label 0) competes in the argmax')
    with pytest.raises(ValueError, match=r"preset='voc20' sets the prompts.*do not also give \['class_names'\]"):
        evaluate_segmentation(model, None, dataset, CLASSES, preset="voc20")
    with pytest.raises(ValueError, match=r"do not also give \['ignore_index', 'background'\]"):
        evaluate_segmentation(model, None, dataset, preset="voc20", ignore_index=0, background="sky")
    with pytest.raises(ValueError, match=r"pal_ade_protocol=True reproduces PAL's ADE20K protocol: it needs "):
        evaluate_segmentation(model, None, dataset, CLASSES, pal_ade_protocol=True)
    with pytest.raises(ValueError, match=r"give class_names \(the class of each mask label, in label order\) or a"):
        evaluate_segmentation(model, None, dataset)
    with pytest.raises(
        ValueError, match=r"mask labels \[255\] are not labels of preset 'ade150': it reads classes 1\.\.150"
    ):
        evaluate_segmentation(
            model, None, dataset, templates=["a {}."], preset="ade150"
        )  # VOC's void 255 is no ADE label
    model.config.training_summary = {}


def test_overlay(vit_model):
    image = random_images([(20, 30)], seed=4)[0]
    labels = torch.zeros(20, 30, dtype=torch.long)
    labels[:, 15:] = 2
    labels[0, 0] = 255
    colours = palette(3)
    assert colours.tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]  # the VOC colour map
    full = np.asarray(overlay_segmentation(image, labels, alpha=1.0))
    assert full.shape == (20, 30, 3)
    assert (full[5, 20] == colours[2]).all() and (full[5, 5] == colours[0]).all()
    assert (full[0, 0] == np.asarray(image)[0, 0]).all()  # ignored pixel left as it was
    assert (np.asarray(overlay_segmentation(image, labels, alpha=0.0)) == np.asarray(image)).all()
    with pytest.raises(
        ValueError, match=r"label_map of shape \(10, 10\) does not match the image's \(H, W\) \(20, 30\)"
    ):
        overlay_segmentation(image, torch.zeros(10, 10, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input(vit_model, tmp_path):
    import datasets

    model = vit_model
    images = random_images([(40, 50), (24, 24)])
    wrong = datasets.Dataset.from_dict(
        {
            "image": images,
            "mask": [Image.fromarray(np.zeros((40, 50), np.uint8)), Image.fromarray(np.zeros((20, 24), np.uint8))],
        }
    )
    with pytest.raises(
        ValueError, match=r"row 1: mask of shape \(20, 24\) does not match its image of size \(24, 24\)"
    ):
        evaluate_segmentation(model, None, wrong, CLASSES, templates=["a {}."])
    with pytest.raises(ValueError, match=r"mask_column='segmentation' is not a column of the dataset"):
        evaluate_segmentation(model, None, wrong, CLASSES, mask_column="segmentation")
    labels_out_of_range = datasets.Dataset.from_dict(
        {"image": images[:1], "mask": [Image.fromarray(np.full((40, 50), 9, np.uint8))]}
    )
    with pytest.raises(ValueError, match=r"mask labels \[9\] are outside the 3 classes"):
        evaluate_segmentation(model, None, labels_out_of_range, CLASSES, templates=["a {}."])
    model.save_pretrained(tmp_path)
    aligner_only = AlignerModel.from_pretrained(tmp_path, load_encoders=False)
    with pytest.raises(ValueError, match=r"segmenting images needs the vision encoder: this AlignerModel has none"):
        aligner_only.segment(images, CLASSES)
    with pytest.raises(ValueError, match=r"vision_tokens must be \(B, T, d\) token features, got shape \(4, 32\)"):
        segment_tokens(model, torch.zeros(4, 32), torch.zeros(3, 16))
