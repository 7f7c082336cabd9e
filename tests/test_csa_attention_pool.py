"""`csa` (Canonical Similarity Analysis) and `attention_pool` (MAP): each forward against a value computed by hand,
the CCA against scipy, the fit on a planted shared subspace, save/reload tensor by tensor, training lowering the loss,
and the settings refused by name."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import hf_align
from hf_align.methods.attention_pool import AttentionPoolConfig, AttentionPoolHead
from hf_align.methods.csa import CSAAligner, CSAConfig, canonical_correlation_analysis
from hf_align.testing import make_paired_task


def planted_pairs(n: int, vision_dim: int, text_dim: int, shared: int, noise: float, seed: int):
    """Pairs whose only common part is a `shared`-dim latent seen through a random linear map on each side, plus
    independent noise of std `noise` in every vision and text dimension."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, shared, generator=generator)
    to_vision = torch.randn(shared, vision_dim, generator=generator)
    to_text = torch.randn(shared, text_dim, generator=generator)
    vision = latent @ to_vision + noise * torch.randn(n, vision_dim, generator=generator) + 3.0
    text = latent @ to_text + noise * torch.randn(n, text_dim, generator=generator) - 1.0
    return vision, text


def fitted_csa(vision, text, **settings) -> hf_align.AlignerModel:
    model = hf_align.AlignerModel.from_feature_dims(vision.shape[1], text.shape[1], method="csa", **settings)
    model.aligner.init_from_data(vision, text, seed=0)
    return model


# ---------------------------------------------------------------------------------------------- csa: the CCA
def test_csa_canonical_correlations_equal_scipy_principal_angle_cosines():
    # Canonical correlations are the cosines of the principal angles between the centred column spaces.
    vision, text = planted_pairs(200, 6, 5, shared=2, noise=1.0, seed=0)
    vision, text = vision.double() - vision.double().mean(0), text.double() - text.double().mean(0)
    a_v, a_t, correlations = canonical_correlation_analysis(vision, text, 5)
    reference = np.sort(np.cos(scipy.linalg.subspace_angles(vision.numpy(), text.numpy())))[::-1]
    np.testing.assert_allclose(correlations.numpy(), reference, rtol=0, atol=1e-10)
    # the variates have unit covariance on each side and correlation ρ_i in dimension i only
    u, v = vision @ a_v, text @ a_t
    identity = torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(u.T @ u / 199, identity, rtol=0, atol=1e-10)
    torch.testing.assert_close(v.T @ v / 199, identity, rtol=0, atol=1e-10)
    torch.testing.assert_close(u.T @ v / 199, torch.diag(correlations), rtol=0, atol=1e-10)


def test_csa_forward_is_the_authors_correlation_weighted_cosine():
    vision, text = planted_pairs(300, 8, 7, shared=3, noise=0.5, seed=1)
    model = fitted_csa(vision, text, projection_dim=4)
    aligner = model.aligner
    assert aligner.embed_dim == 6 and model.config.projection_dim == 6  # s + the two padding coordinates

    # By hand, in float64: project the centred features, normalise rows, weight by |mean of the training products|.
    def canonical(x, mean, directions):
        u = (x.double() - mean.double()) @ directions.double()
        return u / u.norm(dim=1, keepdim=True)

    train_u = canonical(vision, vision.mean(0), aligner.vision_directions)
    train_v = canonical(text, text.mean(0), aligner.text_directions)
    weights = (train_u * train_v).mean(0).abs()
    torch.testing.assert_close(aligner.weights.double(), weights, rtol=0, atol=1e-6)
    # ≈ ρ_i / s (a mean of products of unit-vector coordinates): the three planted dimensions weigh the most
    assert weights[:3].min() > 2 * weights[3:].max() and torch.all(weights <= 1)

    queries_v, queries_t = planted_pairs(5, 8, 7, shared=3, noise=0.5, seed=2)
    u = canonical(queries_v, aligner.vision_mean, aligner.vision_directions)
    v = canonical(queries_t, aligner.text_mean, aligner.text_directions)
    expected = (u[:, None, :] * v[None, :, :] * weights).sum(-1)  # Σ_i w_i û_i v̂_i, every image-text pair

    with torch.no_grad():
        output = model(vision_features=queries_v, text_features=queries_t)
        image = model.get_image_features(vision_features=queries_v)
        text_embeds = model.get_text_features(text_features=queries_t)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(5), rtol=0, atol=1e-6)
    torch.testing.assert_close((image @ text_embeds.T).double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(aligner.canonical_similarity(queries_v, queries_t).double(), expected, rtol=0, atol=1e-5)
    scale = model.logit_scale.exp().item()
    torch.testing.assert_close(output.logits_per_image.double(), scale * expected, rtol=1e-5, atol=1e-5)


def test_csa_equal_weights_scores_by_the_plain_cosine_in_the_canonical_space():
    vision, text = planted_pairs(200, 6, 6, shared=2, noise=1.0, seed=3)
    model = fitted_csa(vision, text, projection_dim=3, equal_weights=True)
    torch.testing.assert_close(model.aligner.weights, torch.ones(3))
    with torch.no_grad():
        u = F.normalize((vision[:4] - vision.mean(0)) @ model.aligner.vision_directions, dim=-1)
        v = F.normalize((text[:4] - text.mean(0)) @ model.aligner.text_directions, dim=-1)
        scores = (
            model.get_image_features(vision_features=vision[:4]) @ model.get_text_features(text_features=text[:4]).T
        )
    torch.testing.assert_close(scores, u @ v.T, rtol=0, atol=1e-5)


def test_csa_fit_recovers_a_planted_shared_subspace():
    # 2 000 pairs, 40- and 30-wide features sharing a 6-dim latent under noise: the fit finds 6 correlated dimensions
    # and nothing else, and with s = 6 held-out pairs are retrieved far above chance (1 in 500).
    vision, text = planted_pairs(2500, 40, 30, shared=6, noise=0.5, seed=4)
    correlations = fitted_csa(vision[:2000], text[:2000], projection_dim=12).aligner.canonical_correlations
    assert torch.all(correlations[:6] > 0.98), correlations
    assert torch.all(correlations[6:] < 0.3), correlations  # chance correlations of 2 000 noisy pairs
    model = fitted_csa(vision[:2000], text[:2000], projection_dim=6)
    with torch.no_grad():
        scores = (
            model.get_image_features(vision_features=vision[2000:])
            @ model.get_text_features(text_features=text[2000:]).T
        )
    recall_at_1 = (scores.argmax(dim=1) == torch.arange(500)).float().mean().item()
    assert recall_at_1 > 0.95, recall_at_1  # measured 0.978


def test_csa_ridge_keeps_the_fit_from_degenerating_with_fewer_pairs_than_dimensions():
    # 300 pairs of 200 + 150 dims: plain CCA (the authors', r = 0) finds canonical correlations of exactly 1 on the
    # training pairs whatever the data, and retrieves held-out pairs at chance; the default ridge (0.01) does not.
    vision, text = planted_pairs(500, 200, 150, shared=8, noise=2.0, seed=8)
    recalls = {}
    for r in (0.0, 0.01):
        model = fitted_csa(vision[:300], text[:300], projection_dim=8, regularization=r)
        if r == 0.0:
            torch.testing.assert_close(model.aligner.canonical_correlations, torch.ones(8), rtol=0, atol=1e-6)
        with torch.no_grad():
            scores = (
                model.get_image_features(vision_features=vision[300:])
                @ model.get_text_features(text_features=text[300:]).T
            )
        recalls[r] = (scores.argmax(dim=1) == torch.arange(200)).float().mean().item()
    assert CSAConfig().regularization == 0.01
    assert recalls[0.0] < 0.05 and recalls[0.01] > 0.8, recalls  # measured 0.005 and 0.875 (chance 0.005)


def test_csa_save_reload_round_trip_tensor_by_tensor(tmp_path):
    vision, text = planted_pairs(100, 9, 7, shared=2, noise=0.5, seed=5)
    model = fitted_csa(vision, text)  # projection_dim "auto": 2·7 // 3 = 4
    assert model.aligner.dims == 4
    model.save_pretrained(tmp_path)
    reloaded = hf_align.AlignerModel.from_pretrained(tmp_path, load_encoders=False)
    assert isinstance(reloaded.aligner, CSAAligner) and bool(reloaded.aligner.fitted)
    expected = model.state_dict()
    for name in ("vision_mean", "text_mean", "vision_directions", "text_directions", "canonical_correlations"):
        assert f"aligner.{name}" in expected, name
    assert sorted(reloaded.state_dict()) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_csa_fits_through_hf_align_train_and_the_saved_folder_serves_it(tmp_path):
    task = make_paired_task(n=200, seed=0)  # 3 layers a side, the last pair (index 2, the default taps) shared
    model = hf_align.AlignerModel.from_feature_dims(64, 48, method="csa")
    result = hf_align.train(model, task.to_features(), hf_align.AlignmentArguments(output_dir=str(tmp_path)))
    assert result.global_step == 0 and bool(model.aligner.fitted)  # training-free: the fit, no step
    assert model.config.projection_dim == 32 + 2  # "auto": 2·48 // 3 canonical dimensions, + 2 padding coordinates
    reloaded = hf_align.AlignerModel.from_pretrained(str(tmp_path), load_encoders=False)
    with torch.no_grad():
        for m in (model, reloaded):
            m.eval()
        before = model(vision_features=task.vision[2], text_features=task.text[2]).logits_per_image
        after = reloaded(vision_features=task.vision[2], text_features=task.text[2]).logits_per_image
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert (before.argmax(dim=1) == torch.arange(200)).float().mean() > 0.3  # the shared layer pair is aligned


def test_csa_structure_refinement_rewhitens_and_is_seeded():
    vision, text = planted_pairs(300, 8, 7, shared=3, noise=1.0, seed=6)
    plain = fitted_csa(vision, text, projection_dim=4).aligner
    settings = dict(projection_dim=4, refine_weight=10.0, refine_epochs=3, refine_batch_size=64, refine_lr=1e-2)
    refined = fitted_csa(vision, text, **settings).aligner
    again = fitted_csa(vision, text, **settings).aligner
    torch.testing.assert_close(again.vision_directions, refined.vision_directions, rtol=0, atol=0)
    assert (refined.vision_directions - plain.vision_directions).abs().max() > 1e-3  # the refinement moved them
    # re-whitened: unit covariance of the refined variates on the training pairs (with the authors' 1/N)
    for x, directions in ((vision, refined.vision_directions), (text, refined.text_directions)):
        u = (x - x.mean(0)).double() @ directions.double()
        torch.testing.assert_close(u.T @ u / 300, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-4)


def test_csa_refuses_what_cannot_apply():
    with pytest.raises(ValueError, match=r"method 'csa' is training-free .* regulariser\(s\) \['structure'\] would "):
        hf_align.AlignerModel.from_feature_dims(8, 8, method="csa", structure_weight=10.0)
    with pytest.raises(ValueError, match=r"projection_dim=9 must not exceed the narrower feature width .* = 8"):
        hf_align.AlignerModel.from_feature_dims(10, 8, method="csa", projection_dim=9)
    with pytest.raises(ValueError, match=r"csa: projection_dim must be a positive int or 'auto', got 'all'"):
        CSAConfig(projection_dim="all")
    with pytest.raises(ValueError, match=r"csa: regularization must be in \[0.0, inf\], got -0.1"):
        CSAConfig(regularization=-0.1)
    with pytest.raises(ValueError, match=r"csa: refine_batch_size must be at least 2 .* got 1"):
        CSAConfig(refine_batch_size=1)
    model = hf_align.AlignerModel.from_feature_dims(8, 8, method="csa", projection_dim=6, regularization=0.0)
    with pytest.raises(RuntimeError, match=r"csa is not fitted: run hf_align.train"):
        model.get_image_features(vision_features=torch.randn(2, 8))
    vision, text = planted_pairs(5, 8, 8, shared=2, noise=1.0, seed=7)  # 5 pairs: rank 4 after centring
    with pytest.raises(ValueError, match=r"projection_dim=6 canonical dimensions asked for, but the 5 training pairs"):
        model.aligner.init_from_data(vision, text)


# ---------------------------------------------------------------------------------------------- attention_pool
def test_attention_pool_forward_equals_explicit_ops_on_fixed_weights():
    config = AttentionPoolConfig(projection_dim=4, num_heads=2, hidden_dim=3)
    head = AttentionPoolHead(3, config).double()
    with torch.no_grad():
        for i, parameter in enumerate(head.parameters()):  # fixed, distinct, small values in every parameter
            values = torch.arange(parameter.numel(), dtype=torch.float64).reshape(parameter.shape)
            parameter.copy_(torch.sin(values + 7 * i) * 0.5)
    tokens = torch.tensor(
        [[[0.3, -1.0, 0.5], [1.2, 0.1, -0.4], [0.0, 0.7, 0.9]], [[-0.6, 0.2, 0.8], [0.5, 0.5, -1.1], [9.0, 9.0, 9.0]]],
        dtype=torch.float64,
    )
    mask = torch.tensor([[True, True, True], [True, True, False]])  # the second sample's last token is padding

    state = {name: p.detach() for name, p in head.named_parameters()}

    def linear(name, x):
        return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]

    expected = []
    for b in range(2):
        real = tokens[b][mask[b]]  # padding dropped outright, not masked
        projected = linear("in_proj", real)
        keys, values, query = (
            linear("k_proj", projected),
            linear("v_proj", projected),
            linear("q_proj", state["query"][0]),
        )
        heads = []
        for j in range(2):
            part = slice(2 * j, 2 * j + 2)
            scores = keys[:, part] @ query[part] / math.sqrt(2)
            alpha = torch.exp(scores) / torch.exp(scores).sum()
            heads.append((alpha[:, None] * values[:, part]).sum(0))
        pooled = linear("out_proj", torch.cat(heads))
        normed = (pooled - pooled.mean()) / torch.sqrt(pooled.var(unbiased=False) + 1e-5)
        normed = normed * state["norm.weight"] + state["norm.bias"]
        hidden = linear("fc1", normed)
        gelu = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
        expected.append(pooled + linear("fc2", gelu))
    torch.testing.assert_close(head(tokens, mask), torch.stack(expected), rtol=0, atol=1e-12)


def test_attention_pool_initialisation_is_multihead_attentions():
    head = AttentionPoolHead(5, AttentionPoolConfig(projection_dim=64, num_heads=4, hidden_dim=16))
    bound = math.sqrt(6 / (4 * 64))
    for layer in (head.q_proj, head.k_proj, head.v_proj):
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
        assert torch.count_nonzero(layer.bias) == 0
    assert torch.count_nonzero(head.out_proj.bias) == 0
    assert 0.01 < head.query.std().item() < 0.03


def test_attention_pool_training_lowers_the_loss():
    task = make_paired_task(
        n=96, vision_dim=12, text_dim=10, n_vision_layers=1, n_text_layers=1, tokens=True, n_patches=5,
        max_text_tokens=6, seed=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = hf_align.AlignerModel.from_feature_dims(
        12, 10, method="attention_pool", projection_dim=16, num_heads=4, hidden_dim=32
    )
    batch = {
        "vision_features": task.vision_tokens[0],
        "vision_mask": torch.ones(task.vision_tokens[0].shape[:2], dtype=torch.bool),
        "text_features": task.text_tokens[0],
        "text_mask": task.text_mask,
        "return_loss": True,
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    with torch.no_grad():
        before = model(**batch).loss.item()
    for _ in range(60):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < 0.5 * before, (before, after)


def test_attention_pool_save_reload_round_trip_tensor_by_tensor(tmp_path):
    torch.manual_seed(1)
    model = hf_align.AlignerModel.from_feature_dims(6, 5, method="attention_pool", projection_dim=8, num_heads=2)
    model.save_pretrained(tmp_path)
    reloaded = hf_align.AlignerModel.from_pretrained(tmp_path, load_encoders=False)
    expected = model.state_dict()
    assert "aligner.vision_head.query" in expected and "aligner.text_head.fc2.weight" in expected
    assert sorted(reloaded.state_dict()) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_attention_pool_composes_with_structure_on_the_mean_of_the_real_tokens():
    torch.manual_seed(2)
    model = hf_align.AlignerModel.from_feature_dims(
        4, 3, method="attention_pool", projection_dim=4, num_heads=2, hidden_dim=8, structure_weight=10.0,
        structure_warmup_steps=0,
    )  # fmt: skip
    vision = torch.randn(5, 3, 4)
    text = torch.randn(5, 4, 3)
    text_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    text[~text_mask] = 100.0  # padding that a pooled reference including it would be dominated by
    output = model(vision_features=vision, text_features=text, text_mask=text_mask, return_loss=True)
    # by hand: the mean of the real tokens, then the regulariser on those and the embeddings
    text_means = torch.stack([text[b][text_mask[b]].mean(0) for b in range(5)])
    expected = model.regularizers["structure"](vision.mean(1), text_means, output.image_embeds, output.text_embeds)
    torch.testing.assert_close(output.loss_terms["structure"], expected, rtol=0, atol=1e-6)
    assert output.loss_terms["structure"] > 0


def test_attention_pool_refuses_what_cannot_apply():
    with pytest.raises(ValueError, match=r"projection_dim=10 must be a multiple of num_heads=4"):
        AttentionPoolConfig(projection_dim=10, num_heads=4)
    with pytest.raises(ValueError, match=r"attention_pool: dropout must be in \[0.0, 1.0\), got 1.0"):
        AttentionPoolConfig(dropout=1.0)
    with pytest.raises(ValueError, match=r"method 'attention_pool' needs vision_pooling=tokens"):
        hf_align.AlignerModel.from_feature_dims(8, 8, method="attention_pool", vision_pooling="mean")
