"""AlignerModel as a Hub model: building on any encoder pair, CLIP-style outputs, save/load round trips."""

import collections
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForZeroShotImageClassification

import hf_align
import hf_align.aligner_parts
import hf_align.registry
from hf_align import AlignerConfig, AlignerModel
from hf_align.encoders import EncoderLoadError
from hf_align.testing import digits_dataset


def _inputs(model, n=3):
    images = [digits_dataset(n)[i]["image"] for i in range(n)]
    return model.processor(images=images, text=["a cat", "a handwritten digit seven", "two dogs on a sofa"][:n])


@pytest.mark.parametrize("kind", ["vit", "dinov2", "clip", "convnext"])
def test_round_trip_through_automodel_gives_identical_embeddings(kind, tiny_vision_encoders, tiny_bert, tmp_path):
    model = AlignerModel.from_encoders(
        tiny_vision_encoders[kind], tiny_bert, method="mlp", projection_dim=16, hidden_dim=8
    )
    inputs = _inputs(model)
    before = model(**inputs)
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert type(reloaded) is AlignerModel
    after = reloaded(**inputs)
    torch.testing.assert_close(after.image_embeds, before.image_embeds)
    torch.testing.assert_close(after.text_embeds, before.text_embeds)
    torch.testing.assert_close(after.logits_per_image, before.logits_per_image)
    # transformers 5 builds from_pretrained models on the meta device: the encoders must come back with their own
    # weights, not re-initialised ones (which would pass every shape check).
    for name in ("vision_model", "text_model"):
        original, loaded = getattr(model, name).state_dict(), getattr(reloaded, name).state_dict()
        assert original.keys() == loaded.keys()
        for key in original:
            torch.testing.assert_close(loaded[key], original[key], rtol=0, atol=0, msg=f"{name}.{key}")


def test_saved_weights_hold_only_the_aligner(tiny_vit, minilm, tmp_path):
    model = AlignerModel.from_encoders(tiny_vit, minilm, projection_dim=8)
    model.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert keys == {"aligner.vision_head.weight", "aligner.text_head.weight", "logit_scale"}
    assert not any(k.startswith(("vision_model", "text_model")) for k in keys)
    config = AlignerConfig.from_pretrained(tmp_path)
    assert config.vision_encoder == os.path.abspath(tiny_vit)
    assert config.text_encoder == os.path.abspath(minilm)
    assert config.vision_revision is None  # local folders have no commit; Hub ids record their commit hash
    assert (config.vision_hidden_size, config.text_hidden_size) == (32, 384)
    assert (config.vision_num_layers, config.text_num_layers) == (3, 7)


def test_forward_matches_clip_conventions(tiny_vit, minilm):
    model = AlignerModel.from_encoders(tiny_vit, minilm, projection_dim=8, temperature=0.05)
    inputs = _inputs(model)
    out = model(**inputs, return_loss=True)
    images = model.get_image_features(pixel_values=inputs["pixel_values"])
    texts = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert isinstance(images, torch.Tensor) and images.shape == (3, 8)
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.logits_per_image, images @ texts.t() / 0.05)
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.t())
    expected = hf_align.symmetric_infonce(out.logits_per_image)
    torch.testing.assert_close(out.loss, expected)
    assert model(**inputs).loss is None  # loss only when asked, as CLIPModel


def test_precomputed_features_give_the_same_embeddings_as_raw_inputs(tiny_vit, minilm):
    model = AlignerModel.from_encoders(tiny_vit, minilm, vision_layer=1, text_layer=3, projection_dim=8)
    inputs = _inputs(model, 2)
    states = model.vision_model(pixel_values=inputs["pixel_values"], output_hidden_states=True).hidden_states
    cls = states[1][:, 0]
    torch.testing.assert_close(model.get_image_features(vision_features=cls), model.get_image_features(**inputs))
    text_states = model.text_model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], output_hidden_states=True
    ).hidden_states
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    mean = (text_states[3] * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(
        model.get_text_features(text_features=mean),
        model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]),
    )


def test_registered_with_auto_classes(tiny_vit, minilm, tmp_path):
    AlignerModel.from_encoders(tiny_vit, minilm, projection_dim=8).save_pretrained(tmp_path)
    assert type(AutoModelForZeroShotImageClassification.from_pretrained(tmp_path)) is AlignerModel
    assert type(hf_align.AlignerProcessor.from_pretrained(tmp_path)).__name__ == "AlignerProcessor"


def test_bundled_encoders_load_from_the_aligner_folder_alone(tiny_vit, tiny_bert, tmp_path):
    model = AlignerModel.from_encoders(tiny_vit, tiny_bert, projection_dim=8)
    model.save_pretrained(tmp_path / "bundle", bundle_encoders=True)
    with safe_open(os.path.join(tmp_path / "bundle", "model.safetensors"), "pt") as handle:
        assert not any(k.startswith(("vision_model", "text_model")) for k in handle.keys())
    reloaded = AlignerModel.from_pretrained(tmp_path / "bundle")
    assert reloaded.config.bundled_encoders
    for key, value in model.vision_model.state_dict().items():
        torch.testing.assert_close(reloaded.vision_model.state_dict()[key], value, rtol=0, atol=0)


def test_mlp_nonlinear_branch_trains():
    torch.manual_seed(0)
    model = AlignerModel.from_feature_dims(6, 5, method="mlp", projection_dim=4, hidden_dim=8, dropout=0.0).train()
    head = model.aligner.vision_head
    before = {k: v.clone() for k, v in head.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(16, 6), torch.randn(16, 5)
    for _ in range(5):
        loss = model(vision_features=x, text_features=y, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name in ("fc1.weight", "fc2.weight", "alpha"):
        assert not torch.equal(head.state_dict()[name], before[name]), f"{name} did not train"
    assert head.alpha.item() != 0.0 and head.branch(x).abs().sum() > 0  # the branch contributes to the output


def test_infonce_matches_hand_computed_value():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    # rows: CE(row0, 0) = -log(e^2/(e^2+1)), CE(row1, 1) = -log(e^3/(e+e^3))
    rows = (-torch.log(torch.tensor(7.389056 / 8.389056)) - torch.log(torch.tensor(20.085537 / 22.803819))) / 2
    # columns: col0 = [2, 1] target 0, col1 = [0, 3] target 1
    cols = (
        -torch.log(torch.tensor(7.389056 / (7.389056 + 2.718282))) - torch.log(torch.tensor(20.085537 / 21.085537))
    ) / 2
    torch.testing.assert_close(hf_align.symmetric_infonce(logits), (rows + cols) / 2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"square \(B, B\)"):
        hf_align.symmetric_infonce(torch.zeros(2, 3))


def test_learnable_temperature_is_clamped_and_saved(tmp_path):
    model = AlignerModel.from_feature_dims(4, 4, learnable_temperature=True, temperature=0.07, projection_dim=4)
    assert model.logit_scale.requires_grad
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # far above ln 100
    out = model(vision_features=torch.eye(4), text_features=torch.eye(4))
    emb_i, emb_t = out.image_embeds, out.text_embeds
    torch.testing.assert_close(out.logits_per_image, 100.0 * emb_i @ emb_t.t())
    model.save_pretrained(tmp_path)
    reloaded = AlignerModel.from_pretrained(tmp_path, load_encoders=False)
    assert reloaded.logit_scale.item() == 10.0 and reloaded.logit_scale.requires_grad


def test_each_configuration_check_runs_once_per_model(tiny_vit, tiny_bert, tmp_path, monkeypatch):
    calls = collections.Counter()

    def counted(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counted(hf_align.aligner_parts, "get_method")
    counted(hf_align.aligner_parts, "check_similarity")
    counted(hf_align.aligner_parts, "build_regularizers")
    counted(hf_align.registry, "check_settings")  # the type check of every settings dataclass (`from_kwargs`)
    once = {"get_method": 1, "check_similarity": 1, "build_regularizers": 1, "check_settings": 2}  # 2: method + reg.
    model = AlignerModel.from_encoders(tiny_vit, tiny_bert, projection_dim=4, structure_weight=1.0)
    assert calls == once
    calls.clear()
    AlignerModel.from_feature_dims(6, 5, projection_dim=4, structure_weight=1.0)
    assert calls == once
    model.save_pretrained(tmp_path)
    calls.clear()
    reloaded = AlignerModel.from_pretrained(tmp_path)
    assert calls == once
    # set_layers rebuilds the aligner at a new width from what was validated: nothing is checked again
    calls.clear()
    validated = reloaded.aligner.config
    reloaded.set_layers(vision_layer=0, vision_hidden_size=7)
    assert calls == {} and reloaded.aligner.vision_head.in_features == 7 and reloaded.aligner.config is validated


# ------------------------------------------------------------------------------------------ bad input
def test_unknown_method_is_named(tiny_vit, minilm):
    with pytest.raises(ValueError, match=r"unknown method 'linaer'; registered methods: \[.*'linear'.*\]"):
        AlignerModel.from_encoders(tiny_vit, minilm, method="linaer")


def test_unknown_method_argument_is_named():
    with pytest.raises(TypeError, match=r"'linear' got unknown argument\(s\) \['projection_size'\]"):
        AlignerModel.from_feature_dims(4, 4, method="linear", projection_size=3)


def test_layer_out_of_range_is_explained(tiny_vit, minilm):
    with pytest.raises(
        ValueError,
        match=r"vision_layer=7 is out of range: the encoder exposes 3 hidden states \(valid indices -3\.\.2\)",
    ):
        AlignerModel.from_encoders(tiny_vit, minilm, vision_layer=7)
    with pytest.raises(ValueError, match=r"text_layer must be an int hidden-state index .* got 'last'"):
        AlignerModel.from_encoders(tiny_vit, minilm, text_layer="last")


def test_unresolvable_encoder_id_fails_clearly(minilm):
    with pytest.raises(
        EncoderLoadError, match=r"vision_encoder='no-such-org/no-such-model' could not be loaded .*HF_HUB_OFFLINE"
    ):
        AlignerModel.from_encoders("no-such-org/no-such-model", minilm)


def test_mismatched_feature_dimensions_are_rejected():
    model = AlignerModel.from_feature_dims(6, 5, projection_dim=4)
    with pytest.raises(ValueError, match=r"vision_features must have shape \(B, 6\) .* got \(2, 7\)"):
        model(vision_features=torch.zeros(2, 7), text_features=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"give either `input_ids` or `text_features`; got neither"):
        model.get_text_features()


def test_cls_pooling_on_a_convnet_is_refused(tiny_vision_encoders, tiny_bert):
    model = AlignerModel.from_encoders(tiny_vision_encoders["convnext"], tiny_bert, projection_dim=4)
    assert model.config.resolved_vision_pooling == "mean" and not model.config.vision_has_cls
    with pytest.raises(ValueError, match="vision_pooling='cls' but this vision encoder has no CLS token"):
        AlignerModel.from_encoders(tiny_vision_encoders["convnext"], tiny_bert, vision_pooling="cls", projection_dim=4)
