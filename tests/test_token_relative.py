"""`token_relative` (PAL): token relative vectors, cross-attention pooling, padding, late interaction, training on the
synthetic token task, save/load with tiny encoders, and bad input. CPU, offline."""

import math

import pytest
import torch

from hf_align import AlignerModel
from hf_align.evaluation import evaluate_retrieval, retrieval_metrics
from hf_align.features import features_for, features_from_tensors
from hf_align.methods.token_relative import late_interaction_scores
from hf_align.testing import make_paired_task
from hf_align.training import AlignmentArguments, train

LAYER = 2
R2 = 1 / math.sqrt(2)
TAU_P = 0.03


# ---------------------------------------------------------------------------------------------- the 2 x 2 toy case
def cap(values, tau=TAU_P):
    """CAP of one anchor by hand: softmax over the tokens of R/τ, then the weighted mean of R."""
    weights = [math.exp(v / tau) for v in values]
    return sum(w * v for w, v in zip(weights, values)) / sum(weights)


def unit(vector):
    norm = math.sqrt(sum(v * v for v in vector))
    return [v / norm for v in vector]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


# identity anchors, so R[t, k] = k-th coordinate of the normalised token
IMAGES = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [-1.0, 1.0]]])  # (2 images, 2 tokens, d=2)
CAPTIONS = torch.tensor([[[2.0, 0.0], [5.0, 5.0]], [[1.0, 1.0], [0.0, 1.0]]])  # caption 0: 1 real token + padding
CAPTION_MASK = torch.tensor([[True, False], [True, True]])
# R by hand (rows = tokens, columns = anchors)
R_IMAGES = [[[1.0, 0.0], [R2, R2]], [[0.0, 1.0], [-R2, R2]]]
R_CAPTIONS = [[[1.0, 0.0]], [[R2, R2], [0.0, 1.0]]]  # padding dropped


def toy_model(**kwargs):
    model = AlignerModel.from_feature_dims(2, 2, method="token_relative", num_anchors=2, **kwargs)
    with torch.no_grad():
        model.aligner.vision_anchors.copy_(torch.eye(2))
        model.aligner.text_anchors.copy_(torch.eye(2))
    return model


def hand_profiles(relatives, pool):
    return [unit([pool([row[k] for row in tokens]) for k in range(2)]) for tokens in relatives]


@pytest.mark.parametrize("pooling", ["cap", "mean"])
def test_pooled_profiles_and_similarity_equal_hand_computed_values(pooling):
    model = toy_model(pooling=pooling)
    pool = cap if pooling == "cap" else (lambda values: sum(values) / len(values))
    h_v = hand_profiles(R_IMAGES, pool)
    h_t = hand_profiles(R_CAPTIONS, pool)
    with torch.no_grad():
        out = model(vision_features=IMAGES, text_features=CAPTIONS, text_mask=CAPTION_MASK)
    torch.testing.assert_close(out.image_embeds, torch.tensor(h_v))
    torch.testing.assert_close(out.text_embeds, torch.tensor(h_t))
    expected = torch.tensor([[dot(v, t) for t in h_t] for v in h_v])
    torch.testing.assert_close(out.logits_per_image / model.logit_scale.exp(), expected)
    # the CAP numbers themselves, written out for image 0: anchor 0 sees (1, 1/√2), anchor 1 sees (0, 1/√2)
    if pooling == "cap":
        e = math.exp((1 - R2) / TAU_P)
        p0 = (e * 1 + R2) / (e + 1)
        p1 = (0 + math.exp(R2 / TAU_P) * R2) / (1 + math.exp(R2 / TAU_P))
        torch.testing.assert_close(out.image_embeds[0], torch.tensor(unit([p0, p1])))


def test_padding_changes_nothing():
    model = toy_model()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        reference = model.get_text_features(text_features=CAPTIONS, text_mask=CAPTION_MASK)
        # three more padding tokens holding large random values, and the padded slot of caption 0 changed too
        padded = torch.cat([CAPTIONS, 50 * torch.randn(2, 3, 2, generator=generator)], dim=1)
        padded[0, 1] = torch.tensor([-7.0, 3.0])
        mask = torch.cat([CAPTION_MASK, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
        torch.testing.assert_close(model.get_text_features(text_features=padded, text_mask=mask), reference)
        # same for image tokens with a mask (e.g. images of several sizes batched together)
        images = model.get_image_features(vision_features=IMAGES)
        padded_images = torch.cat([IMAGES, 9 * torch.ones(2, 2, 2)], dim=1)
        image_mask = torch.tensor([[True, True, False, False]] * 2)
        torch.testing.assert_close(
            model.get_image_features(vision_features=padded_images, vision_mask=image_mask), images
        )
        # without the mask the padding would count: the check above is not vacuous
        assert not torch.allclose(model.get_text_features(text_features=padded), reference)


def test_late_interaction_equals_hand_computed_value():
    model = toy_model()
    # per word, the best patch by cosine of (normalised) relative vectors, averaged over the real words
    images = [[unit(row) for row in tokens] for tokens in R_IMAGES]
    captions = [[unit(row) for row in tokens] for tokens in R_CAPTIONS]
    expected = torch.tensor(
        [
            [sum(max(dot(p, w) for p in image) for w in caption) / len(caption) for caption in captions]
            for image in images
        ]
    )
    scores = late_interaction_scores(model, IMAGES, CAPTIONS, text_mask=CAPTION_MASK)
    torch.testing.assert_close(scores, expected)
    # it is not a dot product of pooled embeddings: image 0 scores caption 0 at 1 (one word, one perfect patch)
    assert scores[0, 0].item() == pytest.approx(1.0)
    # computed block by block (here one image-caption pair per block), with padded patches masked: same scores
    padded_images = torch.cat([IMAGES, torch.ones(2, 1, 2)], dim=1)
    image_mask = torch.tensor([[True, True, False]] * 2)
    blocked = model.aligner.late_interaction_scores(padded_images, CAPTIONS, image_mask, CAPTION_MASK, block_elements=1)
    torch.testing.assert_close(blocked, expected)
    with pytest.raises(ValueError, match=r"late interaction scores need a token_relative aligner, .* 'relative'"):
        late_interaction_scores(
            AlignerModel.from_feature_dims(2, 2, method="relative", num_anchors=2), IMAGES, CAPTIONS
        )


def test_anchors_are_unit_gaussian_directions_and_the_only_trained_parameters():
    model = AlignerModel.from_feature_dims(64, 48, method="token_relative", num_anchors=32)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["aligner.text_anchors", "aligner.vision_anchors"]
    for anchors in (model.aligner.vision_anchors, model.aligner.text_anchors):
        torch.testing.assert_close(anchors.norm(dim=1), torch.ones(32))
        # N(0, 1) directions: nearly orthogonal in 64 / 48 dims, not a degenerate (repeated) init
        cosines = anchors @ anchors.t() - torch.eye(32)
        assert cosines.abs().max() < 0.7
    assert model.config.vision_pooling == "tokens" and model.config.text_pooling == "tokens"
    assert model.aligner.config.pool_temperature == TAU_P


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def token_task():
    return make_paired_task(n=1000, tokens=True, seed=0)


def fit(model, task, epochs=40, batch_size=100, lr=1e-2, seed=0):
    """InfoNCE on the model's own forward, straight from tensors (the library's train() reads token caches row by row
    from Arrow, too slow for a unit test on a busy CPU; its token path is checked below on a few steps)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    n = task.labels.shape[0]
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these matrices are tiny: intra-op threads only add overhead (10x on a busy CPU)
    try:
        for _ in range(epochs):
            for rows in torch.randperm(n).split(batch_size):
                output = model(
                    vision_features=task.vision_tokens[LAYER][rows],
                    text_features=task.text_tokens[LAYER][rows],
                    text_mask=task.text_mask[rows],
                    return_loss=True,
                )
                optimizer.zero_grad()
                output.loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def test_token_relative_learns_the_synthetic_task_far_above_chance(token_task):
    train_part, held_out = token_task.split(500)
    model = fit(AlignerModel.from_feature_dims(64, 48, method="token_relative", num_anchors=64), train_part)
    recall = evaluate_retrieval(model, None, held_out.to_features())
    # 500 held-out pairs: chance R@1 = 0.2 %, chance R@10 = 2 %
    assert recall["mean_R@1"] > 8.0, recall
    assert recall["mean_R@10"] > 35.0, recall
    # late interaction on the same anchors is also far above chance
    late = late_interaction_scores(
        model, held_out.vision_tokens[LAYER], held_out.text_tokens[LAYER], text_mask=held_out.text_mask
    )
    assert retrieval_metrics(late, torch.arange(500))["mean_R@10"] > 25.0


def test_library_train_runs_on_a_token_cache(token_task):
    train_part, _ = token_task.split(200)
    model = AlignerModel.from_feature_dims(64, 48, method="token_relative", num_anchors=16)
    before = model.aligner.vision_anchors.detach().clone()
    args = AlignmentArguments(max_steps=3, per_device_train_batch_size=64, eval_fraction=0.2, save_model=False)
    result = train(model, train_part.to_features(), args)
    assert result.global_step == 3 and math.isfinite(result.training_loss)
    assert "eval_mean_R@1" in result.metrics
    assert not torch.equal(before, model.aligner.vision_anchors)


# ---------------------------------------------------------------------------------------------- save / load
def test_round_trip_with_tiny_encoders(tiny_vit, tiny_bert, tmp_path):
    model = AlignerModel.from_encoders(tiny_vit, tiny_bert, method="token_relative", num_anchors=16)
    with torch.no_grad():
        model.aligner.vision_anchors.mul_(3.0).add_(1.0)  # not the init: a reload that re-initialises would show
    model.save_pretrained(tmp_path)
    reloaded = AlignerModel.from_pretrained(tmp_path)
    for name in ("vision_anchors", "text_anchors"):
        torch.testing.assert_close(getattr(reloaded.aligner, name), getattr(model.aligner, name), rtol=0, atol=0)
    inputs = model.processor(
        images=[torch.rand(3, 32, 32).mul(255).byte().permute(1, 2, 0).numpy()] * 2,
        text=["a cat", "a very long caption about a small dog"],
    )
    with torch.no_grad():
        expected = model(**inputs)
        got = reloaded(**inputs)
    torch.testing.assert_close(got.logits_per_image, expected.logits_per_image)
    torch.testing.assert_close(got.text_embeds, expected.text_embeds)
    assert reloaded.config.method == "token_relative" and reloaded.config.vision_pooling == "tokens"


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input(token_task):
    with pytest.raises(ValueError, match=r"method 'token_relative' needs vision_pooling=tokens, got 'cls'"):
        AlignerModel.from_feature_dims(64, 48, method="token_relative", vision_pooling="cls")
    with pytest.raises(ValueError, match=r"late interaction .* is not a pooling: train with pooling='cap'"):
        AlignerModel.from_feature_dims(64, 48, method="token_relative", pooling="late_interaction")
    with pytest.raises(ValueError, match=r"pooling must be one of \('cap', 'mean'\)"):
        AlignerModel.from_feature_dims(64, 48, method="token_relative", pooling="max")
    with pytest.raises(ValueError, match=r"pool_temperature must be a finite number > 0"):
        AlignerModel.from_feature_dims(64, 48, method="token_relative", pool_temperature=0.0)
    model = AlignerModel.from_feature_dims(64, 48, method="token_relative", num_anchors=8)
    # a cache without token columns (pooled features only): named, with the layers it does hold
    pooled_only = features_from_tensors({LAYER: token_task.vision[LAYER]}, {LAYER: token_task.text[LAYER]})
    with pytest.raises(ValueError, match=r"the feature cache holds no vision layers \(columns: \['vision_layer_2'"):
        train(model, pooled_only, AlignmentArguments(max_steps=1, save_model=False))
    model.config.vision_layer = model.config.text_layer = LAYER  # as an aligner on real encoders records them
    with pytest.raises(ValueError, match=r"the feature cache has no token vision features for vision_layer=2"):
        features_for(model, pooled_only)
    # pooled tensors handed to a token method
    with pytest.raises(ValueError, match=r"vision_features must have shape \(B, T, 64\)"):
        model.get_image_features(vision_features=token_task.vision[LAYER][:4])
    # a caption whose mask holds no real token
    mask = token_task.text_mask[:4].clone()
    mask[2] = False
    with pytest.raises(ValueError, match=r"text sample\(s\) \[2\] have no real token"):
        model.get_text_features(text_features=token_task.text_tokens[LAYER][:4], text_mask=mask)
    # check_finite=False (what train() passes: it checks the cache once) skips the check and its device sync: the
    # empty caption's profile is then NaN, its neighbours' are not
    unchecked = model.get_text_features(
        text_features=token_task.text_tokens[LAYER][:4], text_mask=mask, check_finite=False
    )
    assert torch.isnan(unchecked[2]).all() and torch.isfinite(unchecked[[0, 1, 3]]).all()
    # late-interaction scoring, called on token sets directly, still refuses it
    with pytest.raises(ValueError, match=r"text sample\(s\) \[2\] have no real token"):
        model.aligner.late_interaction_scores(
            token_task.vision_tokens[LAYER][:4], token_task.text_tokens[LAYER][:4], text_mask=mask
        )
