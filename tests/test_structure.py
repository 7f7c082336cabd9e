"""STRUCTURE regulariser: hand-computed values (both divergences, level weighting, same-image masking), defaults and
presets, invariance, warm-up clock (training) and full weight (evaluation), model integration, bad input."""

import math

import numpy as np
import pytest
import torch

import hf_align
from hf_align import AlignerModel
from hf_align.regularizers.structure import STRUCTURE_PRESETS, StructureConfig, StructureRegularizer

# A 4-sample batch: frozen features (4, 3) and aligned embeddings (4, 2).
FROZEN = [[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 1.0, 1.0], [-1.0, 0.5, 0.0]]
ALIGNED = [[1.0, 0.2], [0.3, 1.0], [-1.0, 0.4], [0.5, -1.0]]


def hand_transition(rows, tau, centering=True, image_ids=None):
    """P = softmax_row(x̂ x̂ᵀ / τ), x̂ = normalised rows minus their mean, written out entry by entry; with `image_ids`,
    rows i ≠ j of the same image are left out of each other's softmax (probability 0)."""
    x = [np.asarray(r, dtype=np.float64) / math.sqrt(sum(v * v for v in r)) for r in rows]
    if centering:
        mean = sum(x) / len(x)
        x = [r - mean for r in x]
    n = len(x)
    p = np.zeros((n, n))
    for i in range(n):
        allowed = [j for j in range(n) if j == i or image_ids is None or image_ids[i] != image_ids[j]]
        z = sum(math.exp(float(x[i] @ x[j]) / tau) for j in allowed)
        for j in allowed:
            p[i, j] = math.exp(float(x[i] @ x[j]) / tau) / z
    return p


def hand_divergence(p, q, divergence):
    """Mean over rows of JS(p_i, q_i) or ½[KL(m_i‖q_i) + KL(m_i‖p_i)], m_i = ½(p_i + q_i), natural log; an entry with
    p = q = 0 contributes 0. `authors_rkl` adds the authors' floor 1e-12 to m, p and q before the logs."""
    eps = 1e-12 if divergence == "authors_rkl" else 0.0
    total = 0.0
    for i in range(p.shape[0]):
        row = 0.0
        for j in range(p.shape[1]):
            if p[i, j] == 0.0 and q[i, j] == 0.0:
                continue
            m = 0.5 * (p[i, j] + q[i, j])
            if divergence == "js":
                row += 0.5 * p[i, j] * math.log(p[i, j] / m) + 0.5 * q[i, j] * math.log(q[i, j] / m)
            else:
                m, fp, fq = m + eps, p[i, j] + eps, q[i, j] + eps
                row += 0.5 * m * math.log(m / fq) + 0.5 * m * math.log(m / fp)
        total += row
    return total / p.shape[0]


def hand_structure(levels, tau, divergence, weighting="none", margin=0.0, image_ids=None):
    p_frozen = hand_transition(FROZEN, tau, image_ids=image_ids)
    p_aligned = hand_transition(ALIGNED, tau, image_ids=image_ids)
    total = 0.0
    for level in range(1, levels + 1):
        d = hand_divergence(
            np.linalg.matrix_power(p_frozen, level), np.linalg.matrix_power(p_aligned, level), divergence
        )
        weight = 1.0 if weighting == "none" else 1.0 / level
        total += weight * max(d - margin, 0.0)
    return total / levels


@pytest.mark.parametrize("divergence", ["js", "authors_rkl", "exact_rkl"])
@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("tau", [0.5, 0.05])
@pytest.mark.parametrize("weighting", ["none", "inverse"])
def test_matches_hand_computation(levels, divergence, tau, weighting):
    expected = hand_structure(levels, tau, divergence, weighting)
    got = hf_align.functional.structure_regularizer(
        torch.tensor(FROZEN), torch.tensor(ALIGNED), levels=levels, tau=tau, divergence=divergence, weighting=weighting
    )
    assert got.dim() == 0
    assert expected > 1e-3
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_defaults_are_the_authors_divergence_and_inverse_weighting():
    frozen, aligned = torch.tensor(FROZEN), torch.tensor(ALIGNED)
    default = hf_align.functional.structure_regularizer(frozen, aligned, levels=2, tau=0.5)
    assert default.item() == pytest.approx(hand_structure(2, 0.5, "authors_rkl", "inverse"), rel=1e-4)
    assert default.item() != pytest.approx(hand_structure(2, 0.5, "js", "inverse"), rel=1e-2)
    assert default.item() != pytest.approx(hand_structure(2, 0.5, "authors_rkl", "none"), rel=1e-2)
    config = StructureConfig()
    assert (config.divergence, config.weighting, config.levels, config.weight) == ("authors_rkl", "inverse", 1, "auto")
    assert StructureRegularizer(config).weight == 10.0  # "auto" unbound to a method: the authors' λ
    # at L = 1 the two weightings agree (w_1 = 1)
    one = [
        hf_align.functional.structure_regularizer(frozen, aligned, tau=0.5, weighting=w).item()
        for w in ("none", "inverse")
    ]
    assert one[0] == one[1]


@pytest.mark.parametrize("divergence", ["js", "authors_rkl", "exact_rkl"])
@pytest.mark.parametrize("levels", [1, 2])
def test_same_image_rows_get_zero_transition_probability(divergence, levels):
    # rows 0 and 1 are two captions of image 5: neither is the other's neighbour, in either space
    frozen, aligned, ids = torch.tensor(FROZEN), torch.tensor(ALIGNED), torch.tensor([5, 5, 8, 9])
    expected = hand_structure(levels, 0.2, divergence, "inverse", image_ids=[5, 5, 8, 9])
    got = hf_align.functional.structure_regularizer(
        frozen, aligned, levels=levels, tau=0.2, divergence=divergence, image_ids=ids
    )
    assert got.item() == pytest.approx(expected, rel=1e-4)
    assert expected != pytest.approx(hand_structure(levels, 0.2, divergence, "inverse"), rel=0.2)  # the mask matters
    # distinct ids mask nothing
    distinct = hf_align.functional.structure_regularizer(
        frozen, aligned, levels=levels, tau=0.2, divergence=divergence, image_ids=torch.tensor([3, 1, 2, 0])
    )
    unmasked = hf_align.functional.structure_regularizer(frozen, aligned, levels=levels, tau=0.2, divergence=divergence)
    assert distinct.item() == unmasked.item()


def test_masked_gradients_are_finite_even_when_a_row_has_no_other_image():
    aligned = torch.randn(6, 3, requires_grad=True)
    ids = torch.tensor([0, 0, 0, 0, 0, 1])  # rows 0-4: one image, so each of them can only step to itself or row 5
    frozen = torch.randn(6, 4)
    for divergence in ("js", "authors_rkl"):
        value = hf_align.functional.structure_regularizer(
            frozen, aligned, levels=3, divergence=divergence, image_ids=ids
        )
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(aligned.grad).all() and aligned.grad.abs().sum() > 0
        aligned.grad = None


def test_js_is_bounded_and_the_authors_variant_is_not_js():
    js = hf_align.functional.structure_regularizer(
        torch.tensor(FROZEN), torch.tensor(ALIGNED), tau=0.05, divergence="js"
    )
    rkl = hf_align.functional.structure_regularizer(
        torch.tensor(FROZEN), torch.tensor(ALIGNED), tau=0.05, divergence="authors_rkl"
    )
    assert 0 < js.item() <= math.log(2)
    assert rkl.item() > js.item()  # KL from the mixture to a peaked row exceeds the JS of the same rows


def test_weighting_margin_and_explicit_levels():
    frozen, aligned = torch.tensor(FROZEN), torch.tensor(ALIGNED)
    js = dict(tau=0.5, divergence="js")
    d1 = hand_structure(1, 0.5, "js")
    d2 = 2 * hand_structure(2, 0.5, "js") - d1  # level-2 divergence alone
    inverse = hf_align.functional.structure_regularizer(frozen, aligned, levels=2, weighting="inverse", **js)
    assert inverse.item() == pytest.approx((d1 + d2 / 2) / 2, rel=1e-4)
    only_second = hf_align.functional.structure_regularizer(frozen, aligned, levels=[2], weighting="none", **js)
    assert only_second.item() == pytest.approx(d2, rel=1e-4)
    margin = 0.5 * (d1 + d2)
    expected = max(d1 - margin, 0) + max(d2 - margin, 0)
    with_margin = hf_align.functional.structure_regularizer(
        frozen, aligned, levels=2, weighting="none", margin=margin, **js
    )
    assert with_margin.item() == pytest.approx(expected / 2, rel=1e-4)
    assert hf_align.functional.structure_regularizer(frozen, aligned, levels=2, margin=1.0, **js).item() == 0.0


def test_zero_when_aligned_is_a_rotation_and_scaling_of_frozen():
    g = torch.Generator().manual_seed(0)
    frozen = torch.randn(32, 8, generator=g)
    # embed in 12 dims, rotate, scale: normalised inner products are unchanged
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    aligned = 4.0 * torch.cat([frozen, torch.zeros(32, 4)], 1) @ q.float()
    for divergence in ("js", "authors_rkl"):
        for levels in (1, 2, 3):
            same = hf_align.functional.structure_regularizer(frozen, aligned, levels=levels, divergence=divergence)
            other = hf_align.functional.structure_regularizer(
                frozen, torch.randn(32, 12, generator=g), levels=levels, divergence=divergence
            )
            assert same.item() == pytest.approx(0.0, abs=1e-6)
            assert other.item() > 1e-3


def test_without_centering_matches_hand_computation():
    p_frozen, p_aligned = hand_transition(FROZEN, 0.5, centering=False), hand_transition(ALIGNED, 0.5, centering=False)
    expected = hand_divergence(p_frozen, p_aligned, "js")
    got = hf_align.functional.structure_regularizer(
        torch.tensor(FROZEN), torch.tensor(ALIGNED), tau=0.5, centering=False, divergence="js"
    )
    assert got.item() == pytest.approx(expected, rel=1e-4)
    assert abs(expected - hand_structure(1, 0.5, "js")) > 1e-3  # centring changes the value on this batch


def test_gradient_reaches_aligned_only_and_is_finite():
    frozen = torch.randn(8, 5, requires_grad=True)
    aligned = torch.randn(8, 3, requires_grad=True)
    value = hf_align.functional.structure_regularizer(frozen, aligned, levels=3, divergence="authors_rkl")
    value.backward()
    assert frozen.grad is None
    assert torch.isfinite(aligned.grad).all() and aligned.grad.abs().sum() > 0


# ------------------------------------------------------------------------------- the registered regulariser
def model_with_structure(**kwargs):
    return AlignerModel.from_feature_dims(6, 5, method="linear", projection_dim=4, **kwargs)


def test_registered_and_configured_through_from_encoders_keywords():
    model = model_with_structure(structure_weight=10.0, structure_levels=3, structure_divergence="authors_rkl")
    assert model.config.regularizers == {"structure": {"weight": 10.0, "levels": 3, "divergence": "authors_rkl"}}
    assert isinstance(model.regularizers["structure"], StructureRegularizer)
    assert model.regularizers["structure"].config == StructureConfig(weight=10.0, levels=3, divergence="authors_rkl")
    with pytest.raises(ValueError, match=r"divergence must be one of \('authors_rkl', 'exact_rkl', 'js'\), got 'kl'"):
        model_with_structure(structure_divergence="kl")
    with pytest.raises(TypeError, match=r"'structure' got unknown argument\(s\) \['lambda'\]"):
        model_with_structure(structure_lambda=1.0)
    with pytest.raises(ValueError, match="levels must be a positive int"):
        model_with_structure(structure_levels=0)


def test_configured_through_the_regularizers_mapping_beside_the_shorthand(tiny_vit, tiny_bert):
    explicit = model_with_structure(regularizers={"structure": {"weight": 10.0, "levels": 3}})
    mixed = model_with_structure(regularizers={"structure": {"weight": 10.0}}, structure_levels=3)
    shorthand = model_with_structure(structure_weight=10.0, structure_levels=3)
    for model in (explicit, mixed, shorthand):
        assert model.config.regularizers == {"structure": {"weight": 10.0, "levels": 3}}
        assert model.regularizers["structure"].config == StructureConfig(weight=10.0, levels=3)
    assert model_with_structure(regularizers={}).config.regularizers == {}
    # one field both ways: refused with both spellings named, before any encoder is loaded (from_encoders too)
    both = r"structure_weight=2\.0 and regularizers\['structure'\]\['weight'\]=10\.0 both set setting 'weight' of"
    with pytest.raises(ValueError, match=both):
        model_with_structure(regularizers={"structure": {"weight": 10.0}}, structure_weight=2.0)
    with pytest.raises(ValueError, match=both):
        AlignerModel.from_encoders(
            "/nonexistent/vision",
            "/nonexistent/text",
            regularizers={"structure": {"weight": 10.0}},
            structure_weight=2.0,
        )
    with pytest.raises(ValueError, match=r"unknown regulariser 'structur'; registered regularisers: \['structure'\]"):
        model_with_structure(regularizers={"structur": {"weight": 1.0}})
    with pytest.raises(
        ValueError, match=r"regularizers must map regulariser names to dicts .* got \{'structure': 10\.0\}"
    ):
        model_with_structure(regularizers={"structure": 10.0})
    with pytest.raises(ValueError, match=r"structure weight must be a float >= 0 or 'auto', got 'high'"):
        model_with_structure(regularizers={"structure": {"weight": "high"}})
    # the mapping reaches from_encoders' config as given
    model = AlignerModel.from_encoders(
        tiny_vit, tiny_bert, projection_dim=4, regularizers={"structure": {"weight": 3.0}}
    )
    assert model.config.regularizers == {"structure": {"weight": 3.0}}
    assert model.regularizers["structure"].config.weight == 3.0


def test_term_is_half_the_sum_over_modalities_with_linear_warmup():
    torch.manual_seed(0)
    model = model_with_structure(structure_weight=10.0, structure_warmup_steps=4, structure_levels=2)
    reg = model.regularizers["structure"]
    batches = [(torch.randn(16, 6), torch.randn(16, 5)) for _ in range(6)]
    model.train()
    for k, (vision, text) in enumerate(batches, start=1):
        out = model(vision_features=vision, text_features=text, return_loss=True)
        raw = 0.5 * (
            hf_align.functional.structure_regularizer(vision, out.image_embeds, levels=2)
            + hf_align.functional.structure_regularizer(text, out.text_embeds, levels=2)
        )
        # batch k uses λ·(k−1)/W, as the authors' loss steps its schedule before the forward pass: batch 1 has none
        expected = 10.0 * min(1.0, (k - 1) / 4) * raw.item()
        assert out.loss_terms["structure"].item() == pytest.approx(expected, rel=1e-5, abs=1e-12)
        assert int(reg.steps_done) == k
    # evaluation calls leave the clock alone
    model.eval()
    out = model(vision_features=batches[0][0], text_features=batches[0][1], return_loss=True)
    assert int(reg.steps_done) == 6 and reg.current_weight() == 10.0
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.loss_terms.values()), rel=1e-6)


def test_evaluation_uses_the_full_weight_at_any_point_of_the_warmup():
    torch.manual_seed(0)
    vision, text = torch.randn(8, 6), torch.randn(8, 5)
    model = model_with_structure(structure_weight=3.0, structure_warmup_steps=1000)
    reg = model.regularizers["structure"]
    evals = []
    for clock in (0, 1, 900):  # a fresh model, warm-up steps 1 and 900
        reg.steps_done.fill_(clock)
        assert reg.current_weight() == pytest.approx(3.0 * clock / 1000)
        out = model.eval()(vision_features=vision, text_features=text, return_loss=True)
        evals.append(out.loss_terms["structure"].item())
        assert int(reg.steps_done) == clock
    raw = 0.5 * (
        hf_align.functional.structure_regularizer(vision, out.image_embeds)
        + hf_align.functional.structure_regularizer(text, out.text_embeds)
    )
    assert evals == [pytest.approx(3.0 * raw.item(), rel=1e-6)] * 3
    # training at clock 900 (batch 901) uses the weight of the clock before the batch: 900/1000
    train_out = model.train()(vision_features=vision, text_features=text, return_loss=True)
    assert train_out.loss_terms["structure"].item() == pytest.approx(3.0 * 0.900 * raw.item(), rel=1e-5)
    assert (
        model_with_structure(structure_weight=3.0, structure_warmup_steps=0).regularizers["structure"].current_weight()
        == 3.0
    )


def test_image_ids_reach_the_regulariser_through_forward():
    torch.manual_seed(1)
    vision, text, ids = torch.randn(8, 6), torch.randn(8, 5), torch.tensor([0, 0, 1, 1, 1, 2, 3, 4])
    model = model_with_structure(structure_weight=2.0, structure_warmup_steps=0).eval()
    out = model(vision_features=vision, text_features=text, return_loss=True, image_ids=ids)
    expected = 0.5 * (
        hf_align.functional.structure_regularizer(vision, out.image_embeds, image_ids=ids)
        + hf_align.functional.structure_regularizer(text, out.text_embeds, image_ids=ids)
    )
    assert out.loss_terms["structure"].item() == pytest.approx(2.0 * expected.item(), rel=1e-6)
    unmasked = model(vision_features=vision, text_features=text, return_loss=True)
    assert unmasked.loss_terms["structure"].item() != pytest.approx(out.loss_terms["structure"].item(), rel=1e-3)
    assert out.loss_terms["infonce"].item() == pytest.approx(
        hf_align.functional.symmetric_infonce(out.logits_per_image, ids).item(), rel=1e-6
    )


def test_presets_are_the_authors_configurations():
    assert sorted(STRUCTURE_PRESETS) == ["L1", "L2", "L3", "L5"]
    for name, levels in (("L1", 1), ("L2", 2), ("L3", 3), ("L5", 5)):
        config = StructureConfig(preset=name)
        assert config.levels == levels and config.weighting == ("none" if levels == 1 else "inverse")
        assert (config.weight, config.warmup_steps, config.tau, config.margin, config.divergence) == (
            10.0,
            1000,
            0.05,
            0.0,
            "authors_rkl",
        )
    # through the model keywords, and compatible with a field equal to the preset's value
    model = model_with_structure(structure_preset="L3", structure_levels=3)
    assert model.regularizers["structure"].config.levels == 3
    assert model.config.regularizers == {"structure": {"preset": "L3", "levels": 3}}
    with pytest.raises(ValueError, match=r"structure preset 'L3' sets levels=3, but levels=2 was given"):
        StructureConfig(preset="L3", levels=2)
    with pytest.raises(ValueError, match=r"preset must be one of \['L1', 'L2', 'L3', 'L5'\] or None, got 'L4'"):
        model_with_structure(structure_preset="L4")


def test_warmup_clock_survives_save_and_load(tmp_path):
    model = model_with_structure(structure_weight=2.0, structure_warmup_steps=10).train()
    for _ in range(3):
        model(vision_features=torch.randn(8, 6), text_features=torch.randn(8, 5), return_loss=True)
    model.save_pretrained(tmp_path)
    loaded = AlignerModel.from_pretrained(tmp_path, load_encoders=False)
    assert int(loaded.regularizers["structure"].steps_done) == 3
    assert loaded.regularizers["structure"].current_weight() == pytest.approx(2.0 * 3 / 10)


def test_token_features_are_rejected():
    reg = StructureRegularizer(StructureConfig())
    tokens = torch.randn(4, 7, 6)
    with pytest.raises(ValueError, match=r"needs pooled features.*vision_features is token features \(B, T, d\)"):
        reg(tokens, torch.randn(4, 5), torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"needs pooled features.*frozen is token features"):
        hf_align.functional.structure_regularizer(tokens, torch.randn(4, 3))


def test_bad_functional_arguments():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="frozen and aligned must hold the same samples: got 4 and 5 rows"):
        hf_align.functional.structure_regularizer(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="tau must be a finite float > 0, got 0"):
        hf_align.functional.structure_regularizer(x, x, tau=0)
    with pytest.raises(ValueError, match=r"weighting must be one of \('none', 'inverse'\), got 'log'"):
        hf_align.functional.structure_regularizer(x, x, weighting="log")
    with pytest.raises(ValueError, match=r"levels must be .* distinct positive ints, got \[1, 1\]"):
        hf_align.functional.structure_regularizer(x, x, levels=[1, 1])
    with pytest.raises(ValueError, match="STRUCTURE needs a batch of at least 2 samples, got 1"):
        hf_align.functional.structure_regularizer(x[:1], x[:1])


def test_structure_with_a_token_method_is_refused_when_the_model_is_built():
    with pytest.raises(
        ValueError, match=r"regulariser 'structure' works on pooled features, but method 'token_relative' takes tokens"
    ):
        AlignerModel.from_feature_dims(8, 8, method="token_relative", structure_weight=1.0)
