"""Compatibility matrix: every supported encoder family, built small from a config, saved and loaded back by path.

For each family at the encoder level: the `auto` taps are the ones its authors use, pooled and token taps have the
right shapes, tapped features equal the encoder's own outputs where that is the contract, a saved and reloaded encoder
gives the same features, and text features do not depend on the padding side or on the rest of the batch.
"""

import os

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, CLIPTextModel, Qwen2Config, SiglipTextModel, T5Model

from hf_align.encoders import EncoderLoadError, load_encoder, probe_text, probe_vision
from hf_align.encoders.loading import run_text_encoder, text_taps, vision_taps
from hf_align.encoders.poolings import as_token_sequence
from hf_align.encoders.taps import Tap, resolve_tap, tap_width
from hf_align.model.processing import prepare_tokenizer
from hf_align.testing import save_tiny_text_encoder, save_tiny_vision_encoder

OWN_POOLER = Tap(-1, "pooler_output", "none")
CLS = Tap(-1, "last_hidden_state", "cls")
MEAN = Tap(-1, "last_hidden_state", "mean")
# What `auto` reads for a pooled method, per family: the encoder's authors' embedding.
VISION_DEFAULT = {
    "vit": CLS,
    "dinov2": CLS,
    "dinov2_registers": CLS,
    "clip": OWN_POOLER,
    "clip_full": OWN_POOLER,
    "siglip": OWN_POOLER,
    "siglip_full": OWN_POOLER,
    "convnext": OWN_POOLER,
    "swin": OWN_POOLER,
    "efficientnet": OWN_POOLER,
    "timm": OWN_POOLER,
    "timm_vit": OWN_POOLER,
}
TEXT_DEFAULT = {
    "bert": MEAN,
    "roberta": MEAN,
    "mpnet": MEAN,
    "xlm_roberta": MEAN,
    "t5": MEAN,
    "clip_full": OWN_POOLER,
    "siglip_full": OWN_POOLER,
    "qwen3": Tap(-1, "last_hidden_state", "last"),
}
TEXTS = ["a cat", "a photo of a big brown dog on the grass", "two birds"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny encoder folders by ("vision" | "text", kind), built on first use."""
    root = tmp_path_factory.mktemp("families")
    built = {}

    def get(modality: str, kind: str) -> str:
        if kind.startswith("timm"):
            pytest.importorskip("timm")
        if (modality, kind) not in built:
            path = str(root / f"{modality}-{kind}")
            if modality == "vision":
                built[modality, kind] = save_tiny_vision_encoder(path, kind)
            else:
                built[modality, kind] = save_tiny_text_encoder(path, kind=kind)
        return built[modality, kind]

    return get


def _pixels(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _reference_pool(state: torch.Tensor, pooling: str, prefix: int) -> torch.Tensor:
    tokens = as_token_sequence(state)
    return tokens[:, 0] if pooling == "cls" else tokens[:, prefix:].mean(dim=1)


@pytest.mark.parametrize("kind", sorted(VISION_DEFAULT))
def test_vision_family(folders, kind, tmp_path):
    path = folders("vision", kind)
    encoder = load_encoder("vision", path, source="auto")
    info = probe_vision(encoder, path)
    pooled = resolve_tap(info, "vision")
    assert pooled == VISION_DEFAULT[kind]
    tokens = resolve_tap(info, "vision", tokens=True)
    assert tokens == Tap(-1, "last_hidden_state", "tokens")
    middle = resolve_tap(info, "vision", layer=1)
    assert middle.source == "hidden_states" and middle.layer == 1
    pixels = _pixels()
    with torch.no_grad():
        (features, no_mask), (token_features, mask), (middle_features, _) = vision_taps(
            encoder, pixels, [pooled, tokens, middle], info.num_prefix_tokens
        )
        own = encoder(pixel_values=pixels, output_hidden_states=True)
    final_tokens = as_token_sequence(own.last_hidden_state)
    assert no_mask is None and features.shape == (2, tap_width(info, pooled))
    assert token_features.shape == (2, final_tokens.shape[1], tap_width(info, tokens))
    assert mask.shape == (2, final_tokens.shape[1]) and bool(mask.all())
    assert middle_features.shape == (2, info.hidden_sizes[1])
    # The contracts: the encoder's own pooled embedding, its own final tokens, and the hidden state asked for.
    if pooled.source == "pooler_output":
        torch.testing.assert_close(features, own.pooler_output.flatten(1), rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(features, final_tokens[:, 0], rtol=0, atol=1e-5)
    assert torch.equal(token_features, final_tokens)
    prefix = info.num_prefix_tokens["hidden_states"]
    torch.testing.assert_close(
        middle_features, _reference_pool(own.hidden_states[1], middle.pooling, prefix), rtol=0, atol=1e-6
    )
    # Saved and loaded back: the same features.
    encoder.save_pretrained(tmp_path / "saved")
    reloaded = load_encoder("vision", str(tmp_path / "saved"), source="auto")
    with torch.no_grad():
        again = vision_taps(reloaded, pixels, [pooled, tokens], info.num_prefix_tokens)
    assert torch.equal(again[0][0], features) and torch.equal(again[1][0], token_features)


@pytest.mark.parametrize("kind", ["dinov2", "dinov2_registers"])
def test_dinov2_default_cls_is_its_pooler_output(folders, kind):
    path = folders("vision", kind)
    encoder = load_encoder("vision", path, source="auto")
    info = probe_vision(encoder, path)
    assert info.num_prefix_tokens["last_hidden_state"] == (1 if kind == "dinov2" else 5)  # CLS (+ 4 registers)
    pixels = _pixels(1)
    with torch.no_grad():
        [(features, _), (legacy, _)] = vision_taps(
            encoder, pixels, [resolve_tap(info, "vision"), Tap(-1, "hidden_states", "cls")], info.num_prefix_tokens
        )
        own = encoder(pixel_values=pixels)
    torch.testing.assert_close(features, own.pooler_output, rtol=0, atol=1e-5)
    # The legacy tap reads hidden_states[-1], before DINOv2's final layer norm: a different vector.
    assert not torch.allclose(legacy, own.pooler_output, atol=1e-2)


@pytest.mark.parametrize("kind", ["dinov2_registers", "timm_vit"])
def test_mean_pooling_leaves_out_cls_and_register_tokens(folders, kind):
    path = folders("vision", kind)
    encoder = load_encoder("vision", path)
    info = probe_vision(encoder, path)
    prefix = info.num_prefix_tokens["last_hidden_state"]
    assert prefix == (5 if kind == "dinov2_registers" else 1)
    with torch.no_grad():
        [(features, _)] = vision_taps(encoder, _pixels(), [MEAN], info.num_prefix_tokens)
        final = as_token_sequence(encoder(pixel_values=_pixels()).last_hidden_state)
    torch.testing.assert_close(features, final[:, prefix:].mean(dim=1), rtol=0, atol=1e-6)


def _dual_features(path: str, modality: str, **inputs) -> torch.Tensor:
    full = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        out = full.get_image_features(**inputs) if modality == "vision" else full.get_text_features(**inputs)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.parametrize("kind", ["clip_full", "siglip_full"])
def test_vision_projected_equals_the_dual_encoders_image_embeds(folders, kind, tmp_path):
    path = folders("vision", kind)
    encoder = load_encoder("vision", path, source="projected")
    info = probe_vision(encoder, path)
    tap = resolve_tap(info, "vision", source="projected")
    assert tap == Tap(-1, "projected", "none")
    pixels = _pixels(2)
    with torch.no_grad():
        [(features, _)] = vision_taps(encoder, pixels, [tap])
    expected = _dual_features(path, "vision", pixel_values=pixels)
    assert features.shape == expected.shape == (2, 16 if kind == "clip_full" else 32)
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)
    encoder.save_pretrained(tmp_path / "tower")  # a bundled tower keeps its projection
    with torch.no_grad():
        [(again, _)] = vision_taps(load_encoder("vision", str(tmp_path / "tower"), source="projected"), pixels, [tap])
    assert torch.equal(again, features)


def test_projected_needs_the_full_repo(folders):
    path = folders("vision", "clip")
    with pytest.raises(EncoderLoadError, match=r"vision_encoder=.*\(clip_vision_model\) has no projection"):
        load_encoder("vision", path, source="projected")
    info = probe_vision(load_encoder("vision", path), path)
    with pytest.raises(ValueError, match=r"vision_source='projected': this clip_vision_model encoder gives"):
        resolve_tap(info, "vision", source="projected")


def _tokenizer(path: str, side: str):
    tokenizer = AutoTokenizer.from_pretrained(path)
    prepare_tokenizer(tokenizer)
    tokenizer.padding_side = side
    return tokenizer


def _text_features(encoder, tokenizer, texts, taps):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return text_taps(encoder, batch["input_ids"], batch["attention_mask"], taps, batch.get("token_type_ids"))


@pytest.mark.parametrize("kind", sorted(TEXT_DEFAULT))
def test_text_family(folders, kind, tmp_path):
    path = folders("text", kind)
    encoder = load_encoder("text", path, source="auto")
    info = probe_text(encoder, path)
    pooled = resolve_tap(info, "text")
    assert pooled == TEXT_DEFAULT[kind]
    assert info.causal == (kind in ("qwen3", "clip_full"))  # CLIP's text tower is causal too
    taps = [pooled, resolve_tap(info, "text", tokens=True), resolve_tap(info, "text", layer=1)]
    width = tap_width(info, pooled)
    results = {side: _text_features(encoder, _tokenizer(path, side), TEXTS, taps) for side in ("right", "left")}
    alone = [_text_features(encoder, _tokenizer(path, "right"), [text], taps) for text in TEXTS]
    for side, ((features, _), (tokens, mask), (middle, _)) in results.items():
        assert features.shape == (3, width) and middle.shape == (3, info.hidden_sizes[1])
        assert tokens.shape[:2] == mask.shape and tokens.shape[2] == info.output_sizes["last_hidden_state"]
        for row, single in enumerate(alone):
            # Independent of the padding side and of the other texts in the batch.
            torch.testing.assert_close(features[row], single[0][0][0], rtol=0, atol=1e-5, msg=f"{side} {row}")
            torch.testing.assert_close(middle[row], single[2][0][0], rtol=0, atol=1e-5, msg=f"{side} {row}")
            torch.testing.assert_close(tokens[row][mask[row]], single[1][0][0], rtol=0, atol=1e-5)
    encoder.save_pretrained(tmp_path / "saved")
    reloaded = load_encoder("text", str(tmp_path / "saved"), source="auto")
    again = _text_features(reloaded, _tokenizer(path, "right"), TEXTS, taps[:1])
    assert torch.equal(again[0][0], results["right"][0][0])


@pytest.mark.parametrize("kind", ["bert", "roberta", "mpnet", "xlm_roberta", "t5"])
def test_text_mean_is_the_masked_mean_of_last_hidden_state(folders, kind):
    path = folders("text", kind)
    encoder = load_encoder("text", path)
    tokenizer = _tokenizer(path, "right")
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    [(features, _)] = _text_features(encoder, tokenizer, TEXTS, [MEAN])
    with torch.no_grad():
        final = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    weights = batch["attention_mask"][..., None].float()
    torch.testing.assert_close(features, (final * weights).sum(1) / weights.sum(1), rtol=0, atol=1e-6)


def test_t5_loads_its_encoder_only(folders):
    path = folders("text", "t5")
    assert type(AutoModel.from_pretrained(path)).__name__ == "T5Model"  # what AutoModel gives: needs decoder inputs
    encoder = load_encoder("text", path)
    assert type(encoder).__name__ == "T5EncoderModel"
    from_instance = load_encoder("text", T5Model.from_pretrained(path))
    assert type(from_instance).__name__ == "T5EncoderModel"
    tokenizer = _tokenizer(path, "right")
    [(a, _)] = _text_features(encoder, tokenizer, TEXTS, [MEAN])
    [(b, _)] = _text_features(from_instance, tokenizer, TEXTS, [MEAN])
    assert torch.equal(a, b)


def test_clip_text_pooled_and_projected_equal_the_models_own(folders):
    path = folders("text", "clip_full")
    tokenizer = _tokenizer(path, "left")  # CLIP finds its end-of-text token only with right padding: re-aligned
    batch = _tokenizer(path, "right")(TEXTS, padding=True, return_tensors="pt")
    [(pooled, _)] = _text_features(load_encoder("text", path), tokenizer, TEXTS, [OWN_POOLER])
    with torch.no_grad():
        own = CLIPTextModel.from_pretrained(path).eval()(**batch).pooler_output
    torch.testing.assert_close(pooled, own, rtol=0, atol=1e-5)
    [(projected, _)] = _text_features(
        load_encoder("text", path, source="projected"), tokenizer, TEXTS, [Tap(-1, "projected", "none")]
    )
    torch.testing.assert_close(projected, _dual_features(path, "text", **batch), rtol=0, atol=1e-5)


def test_siglip_text_pools_as_trained_fixed_length_without_mask(folders):
    path = folders("text", "siglip_full")
    encoder = load_encoder("text", path)
    [(pooled, _)] = _text_features(encoder, _tokenizer(path, "right"), TEXTS, [OWN_POOLER])
    plain = _tokenizer(path, "right")
    batch = plain(TEXTS, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():  # SigLIP's own recipe: padding="max_length", no attention mask
        own = SiglipTextModel.from_pretrained(path).eval()(input_ids=batch["input_ids"]).pooler_output
    torch.testing.assert_close(pooled, own, rtol=0, atol=1e-5)
    long_text = " ".join(["word"] * 20)
    with pytest.raises(ValueError, match="longer than this encoder's fixed length 16"):
        ids = plain([long_text], return_tensors="pt")["input_ids"]
        run_text_encoder(encoder, ids, fixed_length=16)


def test_decoder_last_pooling_reads_the_last_real_token_on_both_sides(folders):
    path = folders("text", "qwen3")
    encoder = load_encoder("text", path)
    last = Tap(-1, "last_hidden_state", "last")
    left, right = (_text_features(encoder, _tokenizer(path, side), TEXTS, [last])[0][0] for side in ("left", "right"))
    torch.testing.assert_close(left, right, rtol=0, atol=1e-5)
    for row, text in enumerate(TEXTS):
        ids = _tokenizer(path, "left")([text], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            final = encoder(input_ids=ids).last_hidden_state
        torch.testing.assert_close(left[row], final[0, -1], rtol=0, atol=1e-5)


def test_tiny_folders_are_hub_format(folders):
    # Loaded by path like a Hub repo: a config and safetensors weights, never a pickle.
    for modality, kind in (("vision", "efficientnet"), ("text", "qwen3"), ("vision", "siglip_full")):
        files = set(os.listdir(folders(modality, kind)))
        assert {"config.json", "model.safetensors"} <= files and not any(f.endswith(".bin") for f in files)


def test_qwen2_decoder_last_pooling_on_both_sides_from_token_ids():
    # Qwen2 (gte-Qwen2 style) loaded as a model instance; token ids by hand, pad id 0 on the left or on the right.
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    encoder = load_encoder("text", AutoModel.from_config(config), source="auto")
    info = probe_text(encoder, "")
    assert info.causal and resolve_tap(info, "text") == Tap(-1, "last_hidden_state", "last")
    texts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    right = torch.tensor([[5, 6, 7, 0, 0], texts[1]])
    left = torch.tensor([[0, 0, 5, 6, 7], texts[1]])
    mask_right = (torch.arange(5) < torch.tensor([[3], [5]])).long()
    mask_left = mask_right.flip(1)
    last = Tap(-1, "last_hidden_state", "last")
    with torch.no_grad():
        [(a, _)] = text_taps(encoder, right, mask_right, [last])
        [(b, _)] = text_taps(encoder, left, mask_left, [last])
        alone = encoder(input_ids=torch.tensor([texts[0]])).last_hidden_state[0, -1]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(a[0], alone, rtol=0, atol=1e-5)
