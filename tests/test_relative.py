"""Relative representations, `asif` (training-free paired anchors) and `relative` (learnable paired anchors).

Hand-computed values for the relative vectors and ASIF's sparsification, retrieval on the synthetic paired task
(anchors = all pairs retrieve themselves; held-out pairs degrade gracefully; `relative` trains far above chance),
save/load round trips, and the errors on bad input. CPU, offline.
"""

import math

import pytest
import torch

import hf_align
from hf_align import AlignerModel
from hf_align.evaluation import evaluate_retrieval, retrieval_metrics
from hf_align.functional.relative_representations import relative_representation
from hf_align.methods.asif import ASIFConfig, auto_topk
from hf_align.testing import make_paired_task
from hf_align.training import AlignmentArguments, train

LAYER = 2  # the synthetic task's shared layer pair is (2, 2) with 3 layers per modality
R2 = 1 / math.sqrt(2)


@pytest.fixture(scope="module")
def task():
    return make_paired_task(n=1200, seed=0)


def held_out_recall(model, task) -> dict:
    with torch.no_grad():
        images = model.get_image_features(vision_features=task.vision[LAYER])
        texts = model.get_text_features(text_features=task.text[LAYER])
    return retrieval_metrics(model.similarity(images, texts), torch.arange(len(images)))


# ---------------------------------------------------------------------------------------------- the function
def test_relative_representation_against_hand_computed_values():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    anchors = torch.tensor([[0.0, 2.0], [3.0, 0.0], [1.0, -1.0]])
    expected_cos = torch.tensor([[0.0, 1.0, R2], [R2, R2, 0.0]])
    expected_dot = torch.tensor([[0.0, 3.0, 1.0], [2.0, 3.0, 0.0]])
    torch.testing.assert_close(relative_representation(x, anchors), expected_cos)
    torch.testing.assert_close(relative_representation(x, anchors, normalize=False), expected_dot)
    # the public name, and token sequences (..., d): each token is represented on its own
    assert hf_align.functional.relative_representation is relative_representation
    tokens = torch.stack([x, x.flip(0)])  # (2, 2, 2)
    out = relative_representation(tokens, anchors)
    assert out.shape == (2, 2, 3)
    torch.testing.assert_close(out[1], expected_cos.flip(0))
    # fp16 token caches come back in fp32
    assert relative_representation(tokens.half(), anchors).dtype == torch.float32


def test_relative_representation_bad_input():
    with pytest.raises(ValueError, match=r"x has width 3 but the anchors have width 2"):
        relative_representation(torch.ones(4, 3), torch.ones(5, 2))
    with pytest.raises(ValueError, match=r"anchors must be a \(K, d\) matrix"):
        relative_representation(torch.ones(4, 2), torch.ones(2, 5, 2))


# ---------------------------------------------------------------------------------------------- asif
def test_asif_embedding_against_hand_computed_values():
    model = AlignerModel.from_feature_dims(2, 2, method="asif", num_anchors=3, topk=2, power=2.0)
    assert model.aligner.trainable is False and model.aligner.embed_dim == 3
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    model.aligner.set_anchors(anchors, anchors)
    x = torch.tensor([[2.0, 1.0], [-1.0, 0.2]])
    # cosines of x0 = (2,1)/√5 to the anchors: 2/√5, 1/√5, 3/√10; top-2: 2/√5 and 3/√10; squared: 0.8, 0.9
    # x1 = (-1, 0.2): cosines -0.981, 0.196, -0.555; top-2: 0.196 and -0.555 -> the negative one counts as 0
    c = 0.2 / math.sqrt(1.04)
    raw = torch.tensor([[0.8, 0.0, 0.9], [0.0, c**2, 0.0]])
    expected = raw / raw.norm(dim=1, keepdim=True)
    torch.testing.assert_close(model.get_image_features(vision_features=x), expected)
    torch.testing.assert_close(model.aligner.embed_patches(x[None]), raw[None])


@pytest.mark.parametrize(
    "anchors,kept", [(1, 1), (4, 2), (5, 3), (4096, 64), (10_000, 100), (82_783, 288), (640_000, 800), (1_600_000, 800)]
)
def test_asif_auto_topk_is_the_square_root_capped_at_the_authors_800(anchors, kept):
    assert auto_topk(anchors) == kept
    config = ASIFConfig(num_anchors=anchors)  # the default topk is "auto"
    assert config.topk == "auto" and config.resolved_topk == kept
    assert ASIFConfig(num_anchors=anchors, topk=1).resolved_topk == 1


def test_asif_auto_topk_keeps_ceil_sqrt_k_entries_per_vector():
    # 10 anchors on the first quadrant of the unit circle and inputs in that quadrant: every cosine is positive, so
    # each row keeps exactly ⌈√10⌉ = 4 non-zeros, the 4 largest cosines raised to p = 8
    angles = torch.linspace(0, math.pi / 2, 10)
    anchors = torch.stack([angles.cos(), angles.sin()], dim=1)
    model = AlignerModel.from_feature_dims(2, 2, method="asif", num_anchors=10)
    model.aligner.set_anchors(anchors, anchors)
    x = torch.tensor([[1.0, 0.1], [1.0, 0.9], [0.2, 1.0]])
    out = model.aligner.embed_image(x)
    assert (out > 0).sum(1).tolist() == [4, 4, 4]
    cosines = relative_representation(x, anchors)
    kept = cosines.topk(4, dim=1).indices.sort(dim=1).values
    assert torch.equal((out > 0).nonzero()[:, 1].view(3, 4), kept)
    torch.testing.assert_close(out.gather(1, kept), cosines.gather(1, kept) ** 8)


def test_asif_anchors_equal_to_all_pairs_retrieve_themselves(task):
    train_part, held_out = task.split(600)
    # A high power makes each relative vector peak at its own anchor (with the authors' p = 8 the many
    # near-duplicate anchors of a cluster blur that peak: ~58 % self-retrieval on this clustered task).
    model = AlignerModel.from_feature_dims(64, 48, method="asif", num_anchors=600, topk=50, power=100.0)
    train(model, train_part.to_features(), AlignmentArguments(eval_fraction=0.0, save_model=False, init_samples=600))
    # every pair is an anchor: image i and caption i both peak at anchor i
    own = held_out_recall(model, train_part)
    assert own["image_to_text_R@1"] == 100.0 and own["text_to_image_R@1"] == 100.0
    # unseen pairs: no longer perfect, but far above chance (R@1 chance = 1/600 = 0.17 %; measured ~22 % / R@10 ~75 %)
    unseen = held_out_recall(model, held_out)
    assert 12.0 < unseen["mean_R@1"] < 90.0, unseen
    assert unseen["mean_R@10"] > 60.0, unseen


def test_asif_train_only_initialises_and_round_trips(task, tmp_path):
    train_part, held_out = task.split(600)
    model = AlignerModel.from_feature_dims(64, 48, method="asif", num_anchors=256, topk=64)
    assert not any(p.requires_grad for p in model.aligner.parameters())
    result = train(model, train_part.to_features(), AlignmentArguments(eval_fraction=0.0, save_model=False))
    assert result.global_step == 0  # training-free: init_from_data only
    # the anchors are training pairs, stored as buffers that travel with the checkpoint
    anchor_rows = model.aligner.vision_anchors
    assert torch.isin(anchor_rows[:, 0], train_part.vision[LAYER][:, 0]).all()
    model.save_pretrained(tmp_path)
    reloaded = AlignerModel.from_pretrained(tmp_path, load_encoders=False)
    torch.testing.assert_close(reloaded.aligner.vision_anchors, model.aligner.vision_anchors, rtol=0, atol=0)
    torch.testing.assert_close(held_out_recall(reloaded, held_out), held_out_recall(model, held_out))


def test_asif_bad_input(task):
    model = AlignerModel.from_feature_dims(64, 48, method="asif", num_anchors=256, topk=64)
    with pytest.raises(RuntimeError, match=r"asif anchors are not set: run hf_align.train"):
        model.get_image_features(vision_features=task.vision[LAYER][:4])
    with pytest.raises(ValueError, match=r"num_anchors=256 paired anchors but init_from_data got only 100 training"):
        model.aligner.init_from_data(task.vision[LAYER][:100], task.text[LAYER][:100])
    with pytest.raises(ValueError, match=r"asif: topk must be a positive int or 'auto', got 'sqrt'"):
        AlignerModel.from_feature_dims(64, 48, method="asif", num_anchors=800, topk="sqrt")
    with pytest.raises(ValueError, match=r"asif: topk=900 must not exceed num_anchors=800"):
        AlignerModel.from_feature_dims(64, 48, method="asif", num_anchors=800, topk=900)
    with pytest.raises(ValueError, match=r"asif: power must be a number > 0"):
        AlignerModel.from_feature_dims(64, 48, method="asif", num_anchors=8, topk=4, power=0)
    with pytest.raises(ValueError, match=r"asif takes pooled \(N, d\) vision features"):
        model.aligner.init_from_data(torch.ones(300, 4, 64), task.text[LAYER][:300])


# ---------------------------------------------------------------------------------------------- relative
def test_relative_embedding_against_hand_computed_values():
    model = AlignerModel.from_feature_dims(2, 2, method="relative", num_anchors=2, anchor_temperature=0.5)
    with torch.no_grad():
        model.aligner.vision_anchors.copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
    x = torch.tensor([[1.0, 1.0]])
    # cosines (1/√2, 1/√2) -> softmax over anchors (0.5, 0.5); plain cosines for relative_mode="cosine"
    torch.testing.assert_close(model.aligner.embed_image(x), torch.tensor([[0.5, 0.5]]))
    x = torch.tensor([[1.0, 0.0]])
    e = math.exp(1 / 0.5)
    torch.testing.assert_close(model.aligner.embed_image(x), torch.tensor([[e / (e + 1), 1 / (e + 1)]]))
    cosine = AlignerModel.from_feature_dims(2, 2, method="relative", num_anchors=2, relative_mode="cosine")
    with torch.no_grad():
        cosine.aligner.vision_anchors.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    torch.testing.assert_close(cosine.aligner.embed_image(torch.tensor([[2.0, 0.0]])), torch.tensor([[1.0, R2]]))


def test_relative_trains_only_anchors_and_beats_chance(task, tmp_path):
    train_part, held_out = task.split(600)
    model = AlignerModel.from_feature_dims(64, 48, method="relative", num_anchors=128)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["aligner.log_anchor_temperature", "aligner.text_anchors", "aligner.vision_anchors"]
    # init_from_data starts the anchors at training pairs: anchor k is image j and caption j for one j
    model.aligner.init_from_data(train_part.vision[LAYER], train_part.text[LAYER], seed=3)
    rows = (model.aligner.vision_anchors[:, None, :] == train_part.vision[LAYER][None]).all(-1).float().argmax(1)
    torch.testing.assert_close(model.aligner.vision_anchors, train_part.vision[LAYER][rows], rtol=0, atol=0)
    torch.testing.assert_close(model.aligner.text_anchors, train_part.text[LAYER][rows], rtol=0, atol=0)
    assert len(rows.unique()) == 128

    args = AlignmentArguments(
        num_train_epochs=30, per_device_train_batch_size=200, learning_rate=1e-2, eval_fraction=0.0, save_model=False
    )
    train(model, train_part.to_features(), args)
    recall = held_out_recall(model, held_out)
    # chance R@1 on 600 held-out pairs is 0.17 %
    assert recall["mean_R@1"] > 25.0, recall
    assert recall["mean_R@10"] > 75.0, recall

    model.save_pretrained(tmp_path)
    reloaded = AlignerModel.from_pretrained(tmp_path, load_encoders=False)
    assert reloaded.aligner.log_anchor_temperature.requires_grad
    torch.testing.assert_close(reloaded.aligner.anchor_temperature, model.aligner.anchor_temperature)
    torch.testing.assert_close(held_out_recall(reloaded, held_out), recall)
    # evaluate_retrieval on a feature cache agrees with scoring the tensors directly
    assert evaluate_retrieval(reloaded, None, held_out.to_features())["mean_R@1"] == pytest.approx(recall["mean_R@1"])


def test_relative_bad_input(task):
    model = AlignerModel.from_feature_dims(64, 48, method="relative", num_anchors=128)
    with pytest.raises(
        ValueError, match=r"relative wants num_anchors=128 paired anchors but init_from_data got only 50"
    ):
        model.aligner.init_from_data(task.vision[LAYER][:50], task.text[LAYER][:50])
    with pytest.raises(ValueError, match=r"relative anchors are pairs: got 60 images and 50 texts"):
        model.aligner.init_from_data(task.vision[LAYER][:60], task.text[LAYER][:50])
    with pytest.raises(ValueError, match=r"relative_mode must be one of \('softmax', 'cosine'\)"):
        AlignerModel.from_feature_dims(64, 48, method="relative", relative_mode="sparse")
    with pytest.raises(TypeError, match=r"'relative' got unknown argument\(s\) \['topk'\]"):
        AlignerModel.from_feature_dims(64, 48, method="relative", topk=3)
    with pytest.raises(ValueError, match=r"vision_features must have shape \(B, 64\)"):
        model.get_image_features(vision_features=torch.ones(2, 3, 64))
