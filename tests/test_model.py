"""AlignerModel as a Hub model: building on any encoder pair, CLIP-style outputs, save/load round trips."""

import collections
import dataclasses
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModel, AutoModelForZeroShotImageClassification

import hf_align
import hf_align.model.aligner_parts
import hf_align.utils.registry
from hf_align import AlignerConfig, AlignerModel
from hf_align.encoders import EncoderLoadError
from hf_align.encoders.sentence_pipeline import NormalizeStep, SentenceEncoder
from hf_align.encoders.taps import Tap
from hf_align.testing import digits_dataset, save_tiny_vision_encoder


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
    expected = hf_align.functional.symmetric_infonce(out.logits_per_image)
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
    torch.testing.assert_close(hf_align.functional.symmetric_infonce(logits), (rows + cols) / 2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"square \(B, B\)"):
        hf_align.functional.symmetric_infonce(torch.zeros(2, 3))


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


def test_an_aligner_only_model_reloads_without_load_encoders_false(tmp_path):
    torch.manual_seed(0)
    model = AlignerModel.from_feature_dims(6, 5, projection_dim=4)
    model.save_pretrained(tmp_path)
    for reloaded in (AlignerModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert not reloaded.has_encoders
        features = torch.randn(3, 6)
        torch.testing.assert_close(reloaded.aligner.embed_image(features), model.aligner.embed_image(features))


def test_an_aligner_recording_one_encoder_only_names_the_missing_one(tmp_path, tiny_vit):
    model = AlignerModel.from_feature_dims(6, 5, projection_dim=4)
    model.config.vision_encoder = tiny_vit
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"records no text_encoder: pass text_model=, or load_encoders=False"):
        AlignerModel.from_pretrained(tmp_path)


def test_each_configuration_check_runs_once_per_model(tiny_vit, tiny_bert, tmp_path, monkeypatch):
    calls = collections.Counter()

    def counted(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counted(hf_align.model.aligner_parts, "get_method")
    counted(hf_align.model.aligner_parts, "check_similarity")
    counted(hf_align.model.aligner_parts, "build_regularizers")
    counted(hf_align.utils.registry, "check_settings")  # the type check of every settings dataclass (`from_kwargs`)
    # check_settings: the method, the similarity head and the regulariser
    once = {"get_method": 1, "check_similarity": 1, "build_regularizers": 1, "check_settings": 3}
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
    convnext = tiny_vision_encoders["convnext"]
    model = AlignerModel.from_encoders(convnext, tiny_bert, vision_source="last_hidden_state", projection_dim=4)
    assert model.config.tap("vision") == Tap(-1, "last_hidden_state", "mean")
    assert model.config.vision_num_prefix_tokens == 0
    with pytest.raises(
        ValueError,
        match=r"vision_pooling='cls' but the vision encoder's last_hidden_state has no CLS token; use 'mean'",
    ):
        AlignerModel.from_encoders(convnext, tiny_bert, vision_pooling="cls", projection_dim=4)
    # A config that asks for it anyway is refused when the model is built.
    config = AlignerConfig.from_dict({**model.config.to_dict(), "vision_pooling": "cls"})
    with pytest.raises(ValueError, match=r"vision_pooling='cls' but the tapped vision sequence has no CLS token"):
        AlignerModel(config)


# ---------------------------------------------------------------------------------------------- taps
def test_every_tap_choice_is_explicit_overridable_and_recorded(tiny_vision_encoders, minilm, tmp_path):
    dinov2 = tiny_vision_encoders["dinov2"]
    model = AlignerModel.from_encoders(dinov2, minilm, projection_dim=8)
    config = model.config
    # `auto` resolved to what the authors use, and recorded: DINOv2's final (normed) CLS token; MiniLM's own pipeline.
    assert (config.vision_source, config.vision_pooling, config.vision_num_prefix_tokens) == (
        "last_hidden_state",
        "cls",
        1,
    )
    assert (config.text_source, config.text_pooling, config.text_hidden_size) == ("sentence_embedding", "none", 384)
    assert config.text_pipeline == {
        "pooling_modes": ["mean"],
        "include_prompt": True,
        "steps": [{"type": "Normalize"}],
        "max_seq_length": 256,
    }
    assert isinstance(model.text_model, SentenceEncoder)
    model.save_pretrained(tmp_path / "auto")
    card = (tmp_path / "auto" / "README.md").read_text()
    assert (
        "| Features read | `last_hidden_state · cls`: the encoder's own final output | `sentence_embedding`: the "
        "repo's sentence-transformers pipeline (mean pooling → Normalize) |" in card
    )

    chosen = AlignerModel.from_encoders(
        dinov2,
        minilm,
        vision_source="hidden_states",
        vision_pooling="mean",
        vision_num_prefix_tokens=0,
        text_source="last_hidden_state",
        text_pooling="cls",
        projection_dim=8,
    )
    assert chosen.config.tap("vision") == Tap(-1, "hidden_states", "mean")
    assert chosen.config.tap("text") == Tap(-1, "last_hidden_state", "cls") and chosen.config.text_pipeline is None
    assert not isinstance(chosen.text_model, SentenceEncoder)  # the pipeline goes unread: the plain model
    inputs = _inputs(chosen)
    with torch.no_grad():
        states = chosen.vision_model(pixel_values=inputs["pixel_values"], output_hidden_states=True).hidden_states
        final = chosen.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        vision, _ = chosen.tapped_vision_features(inputs["pixel_values"])
        text, _ = chosen.tapped_text_features(inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(vision, states[-1].mean(1), rtol=0, atol=1e-6)  # 0 prefix tokens: CLS averaged in
    torch.testing.assert_close(text, final.last_hidden_state[:, 0], rtol=0, atol=1e-6)

    with pytest.raises(ValueError, match=r"vision_source must be one of \('auto', 'hidden_states', .*got 'sentence_"):
        AlignerModel.from_encoders(dinov2, minilm, vision_source="sentence_embedding")
    with pytest.raises(
        ValueError,
        match=r"vision_layer='auto' selects among the encoder's hidden states: vision_source must be 'auto' or "
        r"'hidden_states', got 'pooler_output'",
    ):
        AlignerModel.from_encoders(dinov2, minilm, vision_layer="auto", vision_source="pooler_output")
    with pytest.raises(ValueError, match=r"text_source='last_hidden_state' exists only after the last layer"):
        AlignerModel.from_encoders(dinov2, minilm, text_layer=2, text_source="last_hidden_state")


# An aligner saved before taps existed: its config.json has none of these fields, and `auto` poolings.
TAP_FIELDS = ("vision_source", "text_source", "vision_num_prefix_tokens", "text_pipeline")


@pytest.mark.parametrize(("kind", "pooling"), [("vit", "auto"), ("dinov2", "auto"), ("dinov2", "mean")])
def test_an_aligner_saved_before_taps_loads_and_reads_hidden_states_as_it_did(
    kind, pooling, tiny_vision_encoders, tiny_bert, tmp_path
):
    model = AlignerModel.from_encoders(tiny_vision_encoders[kind], tiny_bert, projection_dim=8)
    model.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    written = json.loads(path.read_text())
    for name in TAP_FIELDS:
        del written[name]
    written.update(vision_pooling=pooling, text_pooling="auto")
    path.write_text(json.dumps(written))

    legacy = AlignerModel.from_pretrained(tmp_path / "old")
    vision_pooling = "cls" if pooling == "auto" else pooling
    assert legacy.config.tap("vision") == Tap(-1, "hidden_states", vision_pooling)
    assert legacy.config.tap("text") == Tap(-1, "hidden_states", "mean")
    assert legacy.config.num_prefix_tokens("vision") == 1  # its `vision_has_cls`
    inputs = _inputs(legacy)
    with torch.no_grad():
        out = legacy(**inputs)
        # What these aligners were trained on: hidden_states[-1] (before the final norm), CLS or mean over patches;
        # the text's masked mean of hidden_states[-1].
        states = legacy.vision_model(pixel_values=inputs["pixel_values"], output_hidden_states=True).hidden_states
        vision = states[-1][:, 0] if vision_pooling == "cls" else states[-1][:, 1:].mean(1)
        text_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        text_states = legacy.text_model(**text_inputs, output_hidden_states=True).hidden_states
        mask = inputs["attention_mask"][..., None].float()
        text = (text_states[-1] * mask).sum(1) / mask.sum(1)
        expected_images = F.normalize(legacy.aligner.embed_image(vision, None), dim=-1)
        expected_texts = F.normalize(legacy.aligner.embed_text(text, None), dim=-1)
        new_tap = model(**inputs)
    torch.testing.assert_close(out.image_embeds, expected_images, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.text_embeds, expected_texts, rtol=0, atol=1e-6)
    # The same weights read through the new vision tap (after the final norm) give other embeddings: the legacy tap
    # is really the one in use. (BERT has no final norm: its last hidden state is hidden_states[-1].)
    assert not torch.allclose(out.image_embeds, new_tap.image_embeds, atol=1e-3)
    torch.testing.assert_close(out.text_embeds, new_tap.text_embeds, rtol=0, atol=1e-6)
    # Its feature cache holds the hidden-state columns it reads, and training on it sees what it computes.
    features = hf_align.extract_features(legacy, legacy.processor, digits_dataset(3), cache_dir=tmp_path / "cache")
    assert features.column_names == ["vision_layer_2", "text_layer_2", "image_id"]
    batch = hf_align.FeatureCollator()(hf_align.features_for(legacy, features)[:])
    with torch.no_grad():
        cached = legacy.get_image_features(vision_features=batch["vision_features"])
        raw = legacy.get_image_features(**legacy.processor(images=list(digits_dataset(3)["image"])))
    torch.testing.assert_close(cached, raw, rtol=0, atol=1e-5)


def test_from_pretrained_reloads_the_encoder_wrappers_it_was_saved_with(minilm, tmp_path):
    # A full CLIP repo read through its projection, and MiniLM through its sentence-transformers pipeline: both come
    # back as they were saved, from the encoders' own folders and from a bundle.
    clip = save_tiny_vision_encoder(str(tmp_path / "clip"), "clip_full")
    model = AlignerModel.from_encoders(clip, minilm, vision_source="projected", projection_dim=8)
    assert model.config.tap("vision") == Tap(-1, "projected", "none") and model.config.vision_hidden_size == 16
    assert type(model.vision_model).__name__ == "CLIPVisionModelWithProjection"
    inputs = _inputs(model)
    with torch.no_grad():
        before = model(**inputs)
    model.save_pretrained(tmp_path / "referenced")
    model.save_pretrained(tmp_path / "bundled", bundle_encoders=True)
    assert os.path.isfile(tmp_path / "bundled" / "text_encoder" / "modules.json")
    shutil.rmtree(clip)  # the bundle alone must do for the vision tower
    with pytest.raises(EncoderLoadError, match="vision_encoder=.*clip' could not be loaded"):
        AlignerModel.from_pretrained(tmp_path / "referenced")
    reloaded = AlignerModel.from_pretrained(tmp_path / "bundled")
    assert type(reloaded.vision_model) is type(model.vision_model)
    assert isinstance(reloaded.text_model, SentenceEncoder)
    assert reloaded.text_model.pipeline.describe() == model.config.text_pipeline
    with torch.no_grad():
        after = reloaded(**inputs)
    for name in ("image_embeds", "text_embeds", "logits_per_image"):
        torch.testing.assert_close(getattr(after, name), getattr(before, name), rtol=0, atol=0, msg=name)
    # A text encoder without the pipeline the aligner was built on, or with another one, is refused by name.
    plain = reloaded.text_model.model
    with pytest.raises(ValueError, match=r"text encoder .* gives no 'sentence_embedding' \(it gives \['hidden_states'"):
        reloaded.attach_encoders(reloaded.vision_model, plain)
    cls_pipeline = dataclasses.replace(reloaded.text_model.pipeline, pooling_modes=("cls",))
    with pytest.raises(
        ValueError,
        match=r'the aligner reads the sentence-transformers pipeline \{.*"pooling_modes": \["mean"\].* but the text '
        r'encoder given has \{.*"pooling_modes": \["cls"\]',
    ):
        reloaded.attach_encoders(reloaded.vision_model, SentenceEncoder(plain, cls_pipeline, [NormalizeStep()]))


def test_set_layers_keeps_a_tap_after_the_last_layer_or_moves_it_to_a_hidden_state(tiny_vision_encoders, tiny_bert):
    model = AlignerModel.from_encoders(tiny_vision_encoders["dinov2"], tiny_bert, projection_dim=8)
    model.set_layers(vision_layer=2, text_layer=-1)  # the last hidden state: the encoders' own outputs there stay
    assert model.config.tap("vision") == Tap(-1, "last_hidden_state", "cls")
    assert model.config.tap("text") == Tap(-1, "last_hidden_state", "mean")
    model.set_layers(vision_layer=1)
    assert model.config.tap("vision") == Tap(1, "hidden_states", "cls") and model.config.vision_num_prefix_tokens == 1
    pixel_values = _inputs(model)["pixel_values"]
    with torch.no_grad():
        states = model.vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        torch.testing.assert_close(model.tapped_vision_features(pixel_values)[0], states[1][:, 0], rtol=0, atol=0)
