"""`token_relative(projector_dim=m)`: PAL's bottleneck projector ablation (the authors' `token_k512_proj512`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_align import AlignerModel


def model_with(projector_dim: int, seed: int = 0) -> AlignerModel:
    torch.manual_seed(seed)
    return AlignerModel.from_feature_dims(6, 5, method="token_relative", num_anchors=4, projector_dim=projector_dim)


def tokens(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    vision = torch.randn(3, 4, 6, generator=g)
    text = torch.randn(3, 3, 5, generator=g)
    text_mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    return vision, text, text_mask


def test_the_projector_starts_as_the_identity():
    plain, projected = model_with(0), model_with(3)
    projected.aligner.vision_anchors.data.copy_(plain.aligner.vision_anchors)
    projected.aligner.text_anchors.data.copy_(plain.aligner.text_anchors)
    assert torch.count_nonzero(projected.aligner.vision_projector.up.weight) == 0
    assert torch.count_nonzero(projected.aligner.text_projector.up.bias) == 0
    assert torch.count_nonzero(projected.aligner.vision_projector.down.weight) > 0  # a real Linear init
    vision, text, mask = tokens()
    for m in (plain, projected):
        m.eval()
    torch.testing.assert_close(
        projected.get_image_features(vision_features=vision), plain.get_image_features(vision_features=vision)
    )
    torch.testing.assert_close(
        projected.get_text_features(text_features=text, text_mask=mask),
        plain.get_text_features(text_features=text, text_mask=mask),
    )


@pytest.mark.parametrize("pooling", ["cap", "mean"])
def test_forward_with_a_trained_projector_matches_the_equations(pooling):
    model = AlignerModel.from_feature_dims(
        6, 5, method="token_relative", num_anchors=4, projector_dim=3, pooling=pooling
    ).eval()
    aligner = model.aligner
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in (aligner.text_projector.up, aligner.text_projector.down):
            module.weight.copy_(torch.randn(module.weight.shape, generator=g))
            module.bias.copy_(torch.randn(module.bias.shape, generator=g))
    _, text, mask = tokens()
    p = aligner.text_projector
    z = text + (F.gelu(text @ p.down.weight.T + p.down.bias) @ p.up.weight.T + p.up.bias)
    cos = F.normalize(z, dim=-1) @ F.normalize(aligner.text_anchors, dim=-1).T  # (B, T, K)
    if pooling == "cap":
        logits = (cos / 0.03).masked_fill(~mask[..., None], float("-inf"))
        profile = (logits.softmax(dim=1) * cos).sum(dim=1)
    else:
        profile = (cos * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    expected = F.normalize(profile, dim=-1)
    got = model.get_text_features(text_features=text, text_mask=mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_save_reload_keeps_the_trained_projector(tmp_path):
    model = model_with(3)
    with torch.no_grad():
        model.aligner.vision_projector.up.weight.fill_(0.25)
    model.save_pretrained(tmp_path)
    reloaded = AlignerModel.from_pretrained(tmp_path, load_encoders=False)
    assert reloaded.config.method_config["projector_dim"] == 3
    saved, loaded = model.aligner_state_dict(), reloaded.aligner_state_dict()
    assert saved.keys() == loaded.keys() and any("vision_projector.up.weight" in k for k in saved)
    for key in saved:
        torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=0)


def test_training_moves_the_projector_off_the_identity():
    from hf_align import AlignmentArguments, train
    from hf_align.testing import make_paired_task

    task = make_paired_task(
        n=64, vision_dim=6, text_dim=5, n_vision_layers=1, n_text_layers=1, tokens=True, n_patches=4, max_text_tokens=3
    )
    model = model_with(3)
    train(model, task.to_features(with_labels=False), AlignmentArguments(max_steps=3, learning_rate=1e-2))
    assert torch.count_nonzero(model.aligner.text_projector.up.weight) > 0


@pytest.mark.parametrize(
    "value, message",
    [
        (-1, r"token_relative: projector_dim must be an int >= 0 \(0: no projector\), got -1"),
        (2.5, r"'token_relative' setting projector_dim must be an int, got 2.5"),
        (2**17, r"projector_dim=131072 is above its upper bound 65,536"),
    ],
)
def test_bad_projector_dims_are_named(value, message):
    with pytest.raises(ValueError, match=message):
        AlignerModel.from_feature_dims(6, 5, method="token_relative", num_anchors=4, projector_dim=value)
