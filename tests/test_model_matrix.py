"""Compatibility matrix at the model level: every encoder family of `test_encoder_matrix`, built small, under a pooled
(`linear`) and a token (`token_relative`) aligner through `AlignerModel.from_encoders`.

For each: what `auto` taps is recorded in the config, the forward pass scores every image against every text, a saved
and reloaded aligner gives the same tensors, and a feature cache (`extract_features` + `features_for`) gives the
embeddings the model computes on raw inputs.
"""

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer, models

from hf_align import AlignerModel, FeatureCollator, extract_features, features_for
from hf_align.encoders.taps import Tap
from hf_align.features import tap_column
from hf_align.testing import TEXT_KINDS, VISION_KINDS, digits_dataset, save_tiny_text_encoder, save_tiny_vision_encoder

# Each vision family with a text family (the text families cycle): every family of both lists runs under both methods.
PAIRS = [(vision, TEXT_KINDS[i % len(TEXT_KINDS)]) for i, vision in enumerate(VISION_KINDS)]
# What `auto` reads for a pooled method (the token method reads `last_hidden_state` tokens everywhere).
OWN_POOLER = ("pooler_output", "none")
VISION_TAP = {kind: ("last_hidden_state", "cls") for kind in ("vit", "dinov2", "dinov2_registers")}
TEXT_TAP = {kind: ("last_hidden_state", "mean") for kind in ("bert", "roberta", "mpnet", "xlm_roberta", "t5")}
TEXT_TAP.update(clip_full=OWN_POOLER, siglip_full=OWN_POOLER, qwen3=("last_hidden_state", "last"))
METHODS = {"linear": {"projection_dim": 8}, "token_relative": {"num_anchors": 4}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    built = {}

    def get(modality: str, kind: str) -> str:
        if kind.startswith("timm"):
            pytest.importorskip("timm")
        if (modality, kind) not in built:
            path = str(root / f"{modality}-{kind}")
            save = save_tiny_vision_encoder if modality == "vision" else save_tiny_text_encoder
            built[modality, kind] = save(path, kind=kind)
        return built[modality, kind]

    return get


@pytest.fixture(scope="module")
def data():
    return digits_dataset(4)


@pytest.fixture(scope="module")
def raw(data):
    return {"images": list(data["image"]), "text": list(data["caption"])}


def _close(actual, expected, tokens: bool, what: str):
    # Token columns are stored as float16 (the cache's format for sequences); pooled ones as float32.
    torch.testing.assert_close(actual, expected, rtol=0, atol=4e-3 if tokens else 1e-5, msg=what)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize(("vision_kind", "text_kind"), PAIRS, ids=[f"{v}+{t}" for v, t in PAIRS])
def test_family_under_method(folders, data, raw, vision_kind, text_kind, method, tmp_path):
    model = AlignerModel.from_encoders(
        folders("vision", vision_kind), folders("text", text_kind), method=method, **METHODS[method]
    )
    tokens = method == "token_relative"
    config = model.config
    expected = {
        "vision": ("last_hidden_state", "tokens") if tokens else VISION_TAP.get(vision_kind, OWN_POOLER),
        "text": ("last_hidden_state", "tokens") if tokens else TEXT_TAP[text_kind],
    }
    for modality, (source, pooling) in expected.items():
        assert config.tap(modality) == Tap(-1, source, pooling), modality
        assert (getattr(config, f"{modality}_source"), getattr(config, f"{modality}_pooling")) == (source, pooling)

    inputs = model.processor(**raw)
    with torch.no_grad():
        out = model(**inputs, return_loss=True)
    assert out.logits_per_image.shape == (4, 4) and torch.isfinite(out.loss)

    model.save_pretrained(tmp_path / "aligner")
    reloaded = AlignerModel.from_pretrained(tmp_path / "aligner")
    recorded = {k: v for k, v in reloaded.config.to_dict().items() if k != "_name_or_path"}  # where it was loaded
    assert recorded == {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
    saved, loaded = model.aligner_state_dict(), reloaded.aligner_state_dict()
    assert saved.keys() == loaded.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)
    with torch.no_grad():
        again = reloaded(**inputs)
    for name in ("image_embeds", "text_embeds", "logits_per_image"):
        torch.testing.assert_close(getattr(again, name), getattr(out, name), rtol=0, atol=0, msg=name)

    features = extract_features(model, model.processor, data, cache_dir=tmp_path / "cache")
    assert {tap_column(config, "vision"), tap_column(config, "text")} <= set(features.column_names)
    batch = FeatureCollator()(features_for(model, features)[:])
    with torch.no_grad():
        cached_images = model.get_image_features(
            vision_features=batch["vision_features"], vision_mask=batch.get("vision_mask")
        )
        cached_texts = model.get_text_features(text_features=batch["text_features"], text_mask=batch.get("text_mask"))
    _close(cached_images, out.image_embeds, tokens, "image embeddings from the cache")
    _close(cached_texts, out.text_embeds, tokens, "text embeddings from the cache")


def test_a_sentence_transformers_cls_repo_caches_the_cls_vector_of_last_hidden_state(folders, data, raw, tmp_path):
    # A sentence-transformers folder (BGE style) whose pooling config says CLS: `auto` reads its pipeline, and the
    # cached text features are the CLS vector of the model's own final output.
    base = folders("text", "bert")
    transformer = models.Transformer(base)
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="cls")
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(tmp_path / "st-cls"))
    model = AlignerModel.from_encoders(folders("vision", "vit"), str(tmp_path / "st-cls"), projection_dim=8)
    assert model.config.tap("text") == Tap(-1, "sentence_embedding", "none")
    assert model.config.text_pipeline["pooling_modes"] == ["cls"]
    features = extract_features(model, model.processor, data, cache_dir=tmp_path / "cache")
    cached = torch.as_tensor(np.asarray(features["text_sentence_embedding"], dtype=np.float32))
    tokens = model.processor(text=raw["text"])
    with torch.no_grad():
        final = model.text_model.model(**tokens).last_hidden_state
    torch.testing.assert_close(cached, final[:, 0], rtol=0, atol=1e-5)
