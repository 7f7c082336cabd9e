"""`sail` (SAIL's StarMLP) and `freeze_align` (Freeze-Align, `combined_vis_cls`): forwards against the equations
written out with explicit tensor ops on tiny fixed weights, the CLS / patch / register split, save and reload, a few
steps of `train()` on a synthetic token task, and STRUCTURE on the pooled references they give it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import hf_align
from hf_align import AlignerConfig, AlignerModel
from hf_align.functional.structure import structure_regularizer
from hf_align.methods.citations import bibtex_entries
from hf_align.testing import make_paired_task
from hf_align.training import train
from hf_align.training.arguments import AlignmentArguments

VISION_DIM, TEXT_DIM = 4, 3
LAYER = 2  # the synthetic task's last (shared) layer, what the aligners read by default
SMALL = {"sail": {"projection_dim": 16, "width_factor": 2}, "freeze_align": {"projection_dim": 16}}


def with_prefix_tokens(prefix: int, method: str, **settings) -> AlignerModel:
    """A features-only aligner whose vision sequences start with `prefix` CLS / register tokens (as probed from an
    encoder; `from_feature_dims` assumes one)."""
    config = AlignerConfig(
        vision_hidden_size=VISION_DIM,
        text_hidden_size=TEXT_DIM,
        method=method,
        method_config=settings,
        vision_pooling="tokens",
        text_pooling="tokens",
        vision_num_prefix_tokens=prefix,
    )
    return AlignerModel(config).eval()


def fill_weights(model: AlignerModel, seed: int) -> None:
    """Every aligner parameter (LayerNorm scales and shifts too) from N(0, 1) with a fixed seed: nothing at its init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.aligner.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm
    return (x - mean) / torch.sqrt(var + 1e-5) * weight + bias


def affine(x: torch.Tensor, layer) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0)))


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = [tokens[b][mask[b]].mean(0) for b in range(tokens.shape[0])]  # the real tokens of each sample
    return torch.stack(rows)


def tokens_and_masks(n: int = 3, seed: int = 0):
    """(n, 6, d_v) vision tokens (the last one padding in sample 0), (n, 5, d_t) text tokens of lengths 5, 2, 3, 4, 1."""
    generator = torch.Generator().manual_seed(seed)
    vision = torch.randn(n, 6, VISION_DIM, generator=generator)
    text = torch.randn(n, 5, TEXT_DIM, generator=generator)
    vision_mask = torch.ones(n, 6, dtype=torch.bool)
    vision_mask[0, -1] = False
    vision[0, -1] = 1e4  # padding: it must not reach any output
    text_mask = torch.arange(5)[None] < torch.tensor([5, 2, 3, 4, 1][:n])[:, None]
    return vision, vision_mask, text, text_mask


# ---------------------------------------------------------------------------------------------- sail
def star_mlp(x: torch.Tensor, mlp) -> torch.Tensor:
    """`g(ReLU6(clamp f1(LN x)) * clamp f2(LN x))` with explicit ops."""
    u = layer_norm(x, mlp.norm.weight, mlp.norm.bias)
    gate = affine(u, mlp.f1).clamp(-1e3, 1e3)
    value = affine(u, mlp.f2).clamp(-1e3, 1e3)
    return affine(torch.minimum(torch.maximum(gate, torch.zeros(())), torch.tensor(6.0)) * value, mlp.g)


def test_sail_forward_matches_hand_computation():
    model = AlignerModel.from_feature_dims(VISION_DIM, TEXT_DIM, method="sail", projection_dim=3, width_factor=2)
    fill_weights(model, seed=1)
    with torch.no_grad():
        model.aligner.vision_mlp.f1.weight.mul_(4.0)  # pre-activations past 6: ReLU6's cap is exercised
        model.aligner.text_mlp.f2.weight.mul_(2e3)  # values past 1e3: the authors' clamp is exercised
    aligner = model.aligner
    assert aligner.vision_mlp.f1.weight.shape == (2 * 2 * VISION_DIM, 2 * VISION_DIM)  # hidden = width_factor · d_in
    vision, vision_mask, text, text_mask = tokens_and_masks()
    with torch.no_grad():
        # image: [CLS ; mean of the real patches], the CLS being token 0 (from_feature_dims: one prefix token)
        x_v = torch.cat([vision[:, 0], masked_mean(vision[:, 1:], vision_mask[:, 1:])], dim=-1)
        x_t = masked_mean(text, text_mask)
        u = layer_norm(x_v, aligner.vision_mlp.norm.weight, aligner.vision_mlp.norm.bias)
        assert (affine(u, aligner.vision_mlp.f1) > 6).any()
        u = layer_norm(x_t, aligner.text_mlp.norm.weight, aligner.text_mlp.norm.bias)
        assert (affine(u, aligner.text_mlp.f2).abs() > 1e3).any()
        expected_image, expected_text = star_mlp(x_v, aligner.vision_mlp), star_mlp(x_t, aligner.text_mlp)

        torch.testing.assert_close(aligner.embed_image(vision, vision_mask), expected_image, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(aligner.embed_text(text, text_mask), expected_text, rtol=1e-5, atol=1e-5)
        image = model.get_image_features(vision_features=vision, vision_mask=vision_mask)
        text_embeds = model.get_text_features(text_features=text, text_mask=text_mask)
    torch.testing.assert_close(image, F.normalize(expected_image, dim=-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text_embeds, F.normalize(expected_text, dim=-1), rtol=1e-5, atol=1e-6)


def test_sail_without_a_cls_token_duplicates_the_token_mean():
    """A CNN's grid has no prefix token: the mean of the tokens stands in for the CLS, `[mean ; mean]`."""
    model = with_prefix_tokens(0, "sail", projection_dim=3, width_factor=2)
    fill_weights(model, seed=2)
    assert model.aligner.vision_num_prefix_tokens == 0
    vision, vision_mask, _, _ = tokens_and_masks()
    with torch.no_grad():
        mean = masked_mean(vision, vision_mask)
        expected = star_mlp(torch.cat([mean, mean], dim=-1), model.aligner.vision_mlp)
        torch.testing.assert_close(model.aligner.embed_image(vision, vision_mask), expected, rtol=1e-5, atol=1e-5)


def test_prefix_count_comes_from_the_encoder(tiny_vision_encoders, tiny_bert):
    """ViT sequences start with a CLS token, ConvNeXt's spatial grid has none: the model tells the aligner."""
    for kind, prefix in (("vit", 1), ("convnext", 0)):
        model = AlignerModel.from_encoders(tiny_vision_encoders[kind], tiny_bert, method="sail", projection_dim=8)
        assert model.config.num_prefix_tokens("vision") == prefix
        assert model.aligner.vision_num_prefix_tokens == prefix, kind


# ---------------------------------------------------------------------------------------------- freeze_align
def patch_projection(z: torch.Tensor, proj) -> torch.Tensor:
    """`W u + b + W'' GELU(W' u + b') + b''` with `u = LN(z)` (dropout off: eval mode)."""
    u = layer_norm(z, proj.norm.weight, proj.norm.bias)
    return affine(u, proj.linear) + affine(gelu(affine(u, proj.fc1)), proj.fc2)


def test_freeze_align_forward_matches_hand_computation():
    # two prefix tokens (CLS + one register): the register is neither the CLS nor a patch
    model = with_prefix_tokens(2, "freeze_align", projection_dim=3)
    fill_weights(model, seed=3)
    aligner = model.aligner
    vision, vision_mask, text, text_mask = tokens_and_masks()
    with torch.no_grad():
        local = patch_projection(vision[:, 2:], aligner.local_vision_proj)  # (B, 4, D), every patch token
        expected_image = masked_mean(local, vision_mask[:, 2:]) + patch_projection(
            vision[:, 0], aligner.cls_vision_proj
        )
        s = masked_mean(patch_projection(text, aligner.local_text_proj), text_mask)
        head = aligner.text_head
        q = affine(s, head.projection)
        expected_text = layer_norm(q + affine(gelu(q), head.fc), head.norm.weight, head.norm.bias)

        torch.testing.assert_close(aligner.embed_image(vision, vision_mask), expected_image, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(aligner.embed_text(text, text_mask), expected_text, rtol=1e-5, atol=1e-5)
        # the register token is read by neither projection: changing it changes nothing
        moved = vision.clone()
        moved[:, 1] += 50.0
        torch.testing.assert_close(aligner.embed_image(moved, vision_mask), expected_image, rtol=1e-5, atol=1e-5)
        image = model.get_image_features(vision_features=vision, vision_mask=vision_mask)
    torch.testing.assert_close(image, F.normalize(expected_image, dim=-1), rtol=1e-5, atol=1e-6)


def test_freeze_align_dropout_acts_in_training_only():
    model = AlignerModel.from_feature_dims(VISION_DIM, TEXT_DIM, method="freeze_align", projection_dim=3, dropout=0.5)
    vision, vision_mask, text, text_mask = tokens_and_masks()
    with torch.no_grad():
        evaluated = model.aligner.embed_text(text, text_mask)
        model.train()
        torch.manual_seed(0)
        trained = model.aligner.embed_text(text, text_mask)
    assert not torch.allclose(trained, evaluated)
    model.eval()
    torch.testing.assert_close(model.aligner.embed_text(text, text_mask).detach(), evaluated, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- both
@pytest.mark.parametrize("method", ["sail", "freeze_align"])
def test_save_reload_round_trip_tensor_by_tensor(method, tmp_path):
    model = with_prefix_tokens(2, method, projection_dim=3)
    fill_weights(model, seed=4)
    model.save_pretrained(tmp_path)
    reloaded = AlignerModel.from_pretrained(tmp_path, load_encoders=False)
    assert reloaded.aligner.vision_num_prefix_tokens == 2
    expected = model.state_dict()
    assert sorted(reloaded.state_dict()) == sorted(expected)
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    vision, vision_mask, text, text_mask = tokens_and_masks()
    inputs = {"vision_features": vision, "vision_mask": vision_mask, "text_features": text, "text_mask": text_mask}
    with torch.no_grad():
        expected_logits, logits = model(**inputs).logits_per_image, reloaded(**inputs).logits_per_image
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["sail", "freeze_align"])
def test_train_lowers_the_loss_on_a_token_task(method):
    task = make_paired_task(n=256, vision_dim=16, text_dim=12, tokens=True, n_patches=6, max_text_tokens=5, seed=3)
    torch.manual_seed(0)
    model = AlignerModel.from_feature_dims(16, 12, method=method, **SMALL[method])
    batch = {
        "vision_features": task.vision_tokens[LAYER],
        "text_features": task.text_tokens[LAYER],
        "text_mask": task.text_mask,
    }
    with torch.no_grad():
        before = float(model(**batch, return_loss=True).loss)
    args = AlignmentArguments(
        max_steps=30, per_device_train_batch_size=64, learning_rate=1e-3, eval_fraction=0.0, save_model=False
    )
    result = train(model, task.to_features(), args)
    assert result.global_step == 30
    model.eval()
    with torch.no_grad():
        after = float(model(**batch, return_loss=True).loss)
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("method", ["sail", "freeze_align"])
def test_structure_compares_the_embeddings_with_the_pooled_tokens(method):
    """`structure_weight=` composes: the term is λ · ½ (R(x_v, image) + R(x_t, text)) with x_v = [CLS ; mean of the
    real patches] and x_t = the mean of the real text tokens, padding left out, and it has a gradient."""
    model = AlignerModel.from_feature_dims(
        VISION_DIM, TEXT_DIM, method=method, projection_dim=3, structure_weight=2.0, structure_warmup_steps=0
    )
    fill_weights(model, seed=5)
    vision, vision_mask, text, text_mask = tokens_and_masks(n=5, seed=6)
    output = model(
        vision_features=vision, vision_mask=vision_mask, text_features=text, text_mask=text_mask, return_loss=True
    )
    x_v = torch.cat([vision[:, 0], masked_mean(vision[:, 1:], vision_mask[:, 1:])], dim=-1)
    x_t = masked_mean(text, text_mask)
    options = model.regularizers["structure"].config.function_kwargs()
    expected = (
        2.0
        * 0.5
        * (
            structure_regularizer(x_v, output.image_embeds, **options)
            + structure_regularizer(x_t, output.text_embeds, **options)
        )
    )
    torch.testing.assert_close(output.loss_terms["structure"], expected, rtol=1e-6, atol=1e-7)
    assert output.loss_terms["structure"].item() > 0
    output.loss_terms["structure"].backward()
    grads = [p.grad for p in model.aligner.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_structure_still_refused_for_token_methods_without_a_pooled_reference():
    with pytest.raises(ValueError, match=r"regulariser 'structure' works on pooled features, but method "):
        AlignerModel.from_feature_dims(VISION_DIM, TEXT_DIM, method="token_relative", structure_weight=1.0)


def test_citations_name_the_papers():
    assert [k for k, _ in bibtex_entries(hf_align.METHODS["sail"].citation)] == ["zhang2025sail", "radford2021clip"]
    assert [k for k, _ in bibtex_entries(hf_align.METHODS["freeze_align"].citation)] == ["maniparambil2025freezealign"]


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_settings_and_inputs():
    with pytest.raises(ValueError, match=r"sail: width_factor must be a positive int, got 0"):
        AlignerModel.from_feature_dims(VISION_DIM, TEXT_DIM, method="sail", width_factor=0)
    with pytest.raises(ValueError, match=r"width_factor=65 is above its upper bound 64"):
        AlignerModel.from_feature_dims(VISION_DIM, TEXT_DIM, method="sail", width_factor=65)
    with pytest.raises(ValueError, match=r"sail: projection_dim must be a positive int, got -1"):
        AlignerModel.from_feature_dims(VISION_DIM, TEXT_DIM, method="sail", projection_dim=-1)
    with pytest.raises(ValueError, match=r"freeze_align: dropout must be in \[0.0, 1.0\), got 1.0"):
        AlignerModel.from_feature_dims(VISION_DIM, TEXT_DIM, method="freeze_align", dropout=1.0)
    with pytest.raises(ValueError, match=r"method 'freeze_align' needs vision_pooling=tokens, got 'mean'"):
        AlignerModel.from_feature_dims(VISION_DIM, TEXT_DIM, method="freeze_align", vision_pooling="mean")
    for method in ("sail", "freeze_align"):
        model = AlignerModel.from_feature_dims(VISION_DIM, TEXT_DIM, method=method, projection_dim=3)
        with pytest.raises(ValueError, match=r"vision_features must have shape \(B, T, 4\)"):
            model.get_image_features(vision_features=torch.randn(2, VISION_DIM))
        # a sequence that is only its CLS token has no patch to average
        with pytest.raises(ValueError, match=rf"{method}: the vision sequence has 1 token\(s\) but 1 prefix token"):
            model.get_image_features(vision_features=torch.randn(2, 1, VISION_DIM))
        with pytest.raises(ValueError, match=rf"{method}: text mask has shape \(2, 3\), expected \(2, 4\)"):
            model.aligner.embed_text(torch.randn(2, 4, TEXT_DIM), torch.ones(2, 3, dtype=torch.bool))
        with pytest.raises(ValueError, match=rf"{method} needs text token features \(B, T, d\); got shape \(2, 3\)"):
            model.aligner.embed_text(torch.randn(2, TEXT_DIM))
