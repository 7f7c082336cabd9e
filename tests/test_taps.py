"""Taps and poolings on hand-made tensors and encoder descriptions: values computed by hand, errors by type and text."""

import pytest
import torch

from hf_align.encoders import EncoderInfo
from hf_align.encoders.outputs import EncoderOutputs, read_tap
from hf_align.encoders.poolings import pool_tokens, right_align
from hf_align.encoders.taps import Tap, check_tap, describe_tap_in_words, legacy_tap, resolve_tap, tap_width
from hf_align.model.configuration import AlignerConfig

# One text of three real tokens (values 1, 2, 3 / 10, 20, 30 / -1, -2, -3 per channel) and one pad (99).
TOKENS = torch.tensor([[[1.0, 10.0, -1.0], [2.0, 20.0, -2.0], [3.0, 30.0, -3.0], [99.0, 99.0, 99.0]]])
RIGHT = torch.tensor([[1, 1, 1, 0]])


def _left(tokens: torch.Tensor) -> torch.Tensor:
    return torch.cat([tokens[:, 3:], tokens[:, :3]], dim=1)  # the pad first


@pytest.mark.parametrize(
    "pooling, expected",
    [
        ("cls", [1.0, 10.0, -1.0]),
        ("last", [3.0, 30.0, -3.0]),
        ("mean", [2.0, 20.0, -2.0]),
        ("max", [3.0, 30.0, -1.0]),
        ("weightedmean", [14 / 6, 140 / 6, -14 / 6]),  # (1*1 + 2*2 + 3*3) / (1 + 2 + 3)
        ("mean_sqrt_len", [6 / 3**0.5, 60 / 3**0.5, -6 / 3**0.5]),
    ],
)
def test_poolings_by_hand_on_either_padding_side(pooling, expected):
    right, _ = pool_tokens(TOKENS, pooling, RIGHT)
    left, _ = pool_tokens(_left(TOKENS), pooling, torch.tensor([[0, 1, 1, 1]]))
    torch.testing.assert_close(right, torch.tensor([expected]), rtol=0, atol=1e-6)
    torch.testing.assert_close(left, right, rtol=0, atol=1e-6)


def test_tokens_pooling_keeps_the_sequence_and_a_bool_mask():
    tokens, mask = pool_tokens(TOKENS, "tokens", RIGHT)
    assert torch.equal(tokens, TOKENS) and mask.dtype == torch.bool and mask.tolist() == [[True, True, True, False]]


def test_prefix_tokens_are_left_out_of_mean_and_max_of_a_feature_map():
    # A (B, C, H, W) map is read as H*W tokens; with 1 prefix token the first cell is left out.
    fmap = torch.arange(8.0).reshape(1, 2, 2, 2)  # channels 0..3 and 4..7
    mean, _ = pool_tokens(fmap, "mean", num_prefix_tokens=1)
    maximum, _ = pool_tokens(fmap, "max", num_prefix_tokens=1)
    assert mean.tolist() == [[2.0, 6.0]] and maximum.tolist() == [[3.0, 7.0]]
    with pytest.raises(ValueError, match=r"pooling must be one of .*got 'median'"):
        pool_tokens(fmap, "median")


def test_right_align_rolls_left_padding_and_refuses_holes():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 1]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    aligned_mask, aligned_ids, none = right_align(mask, ids, None)
    assert aligned_ids.tolist() == [[5, 6, 0, 0], [7, 8, 9, 1]]
    assert aligned_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and none is None
    right_padded = ids[:, :3]
    assert right_align(torch.tensor([[1, 1, 0], [1, 1, 1]]), right_padded)[1] is right_padded  # untouched
    with pytest.raises(ValueError, match=r"attention_mask rows \[1\] have padding between real tokens"):
        right_align(torch.tensor([[1, 1, 1], [1, 0, 1]]), torch.ones(2, 3, dtype=torch.long))


def test_legacy_taps_give_what_they_gave_before_taps():
    torch.manual_seed(0)
    state = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    vision = EncoderOutputs(hidden_states=(state,), last_hidden_state=state)
    text = EncoderOutputs(hidden_states=(state,), last_hidden_state=state, attention_mask=mask)
    # The formulas of hf_align before taps, verbatim: the CLS token, the mean over patches (after one CLS token, or
    # over all tokens without one), the text's masked mean.
    assert torch.equal(read_tap(vision, legacy_tap(0, "cls"), 1)[0], state[:, 0])
    assert torch.equal(read_tap(vision, legacy_tap(0, "mean"), 1)[0], state[:, 1:].mean(dim=1))
    assert torch.equal(read_tap(vision, legacy_tap(0, "mean"), 0)[0], state.mean(dim=1))
    weights = mask.bool().unsqueeze(-1).to(state.dtype)
    expected = (state * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    assert torch.equal(read_tap(text, legacy_tap(0, "mean"))[0], expected)
    assert torch.equal(read_tap(text, legacy_tap(0, "cls"))[0], state[:, 0])
    with pytest.raises(ValueError, match="vision pooling 'cls' but this vision encoder has no CLS token here; use"):
        read_tap(vision, legacy_tap(0, "cls"), 0)


def test_tap_round_trips_through_a_dict_and_describes_itself():
    tap = Tap(3, "hidden_states", "mean")
    assert tap.to_dict() == {"layer": 3, "source": "hidden_states", "pooling": "mean"}
    assert Tap.from_dict(tap.to_dict(), "text") == tap
    assert (
        tap.describe() == "hidden_states[3] · mean" and Tap(-1, "pooler_output", "none").describe() == "pooler_output"
    )
    assert legacy_tap(-1, "cls") == Tap(-1, "hidden_states", "cls")
    with pytest.raises(ValueError, match="a tap is a dict with keys layer, source and pooling; got"):
        Tap.from_dict({"layer": 1, "source": "hidden_states"})


@pytest.mark.parametrize(
    "tap, modality, message",
    [
        (Tap(-1, "pooler_output", "mean"), "vision", r"source 'pooler_output' is already one vector .* got 'mean'"),
        (Tap(2, "projected", "none"), "text", r"source 'projected' follows the last layer: layer must be -1, got 2"),
        (Tap(3, "last_hidden_state", "cls"), "vision", r"'last_hidden_state' is the encoder's final output"),
        (Tap(-1, "sentence_embedding", "none"), "vision", r"'sentence_embedding' .* exists for text only"),
        (Tap(-1, "logits", "none"), "text", r"text tap source must be one of .*got 'logits'"),
        (Tap(-1, "hidden_states", "last"), "vision", r"vision pooling of source 'hidden_states' must be one of"),
        (Tap(True, "hidden_states", "mean"), "text", r"text tap layer must be an int hidden-state index, got True"),
    ],
)
def test_check_tap_refuses_bad_combinations(tap, modality, message):
    with pytest.raises(ValueError, match=message):
        check_tap(tap, modality)


def _info(model_type="", outputs=None, prefix=0, causal=False, sentence_pooling=None, layers=5):
    return EncoderInfo(
        "enc",
        None,
        layers,
        [8] * (layers - 1) + [16],
        bool(prefix),
        model_type,
        {"last_hidden_state": 16, **(outputs or {})},
        {"hidden_states": prefix, "last_hidden_state": prefix},
        causal,
        sentence_pooling,
    )


@pytest.mark.parametrize(
    "info, modality, expected",
    [
        (_info("dinov2", {"pooler_output": 16}, prefix=1), "vision", Tap(-1, "last_hidden_state", "cls")),
        (_info("vit", {"pooler_output": 16}, prefix=1), "vision", Tap(-1, "last_hidden_state", "cls")),
        (_info("ijepa"), "vision", Tap(-1, "last_hidden_state", "mean")),
        (_info("clip_vision_model", {"pooler_output": 16}, prefix=1), "vision", Tap(-1, "pooler_output", "none")),
        (_info("timm_wrapper", {"pooler_output": 32}), "vision", Tap(-1, "pooler_output", "none")),
        (_info("bert", {"pooler_output": 16}), "text", Tap(-1, "last_hidden_state", "mean")),
        (_info("qwen3", causal=True), "text", Tap(-1, "last_hidden_state", "last")),
        (
            _info("bert", {"sentence_embedding": 4}, sentence_pooling="cls"),
            "text",
            Tap(-1, "sentence_embedding", "none"),
        ),
        (_info("siglip_text_model", {"pooler_output": 16, "projected": 16}), "text", Tap(-1, "pooler_output", "none")),
    ],
)
def test_auto_picks_each_familys_own_embedding(info, modality, expected):
    assert resolve_tap(info, modality) == expected
    assert resolve_tap(info, modality, layer=info.num_hidden_states - 1) == expected  # the last index is -1 too


def test_auto_at_an_earlier_layer_reads_hidden_states_with_the_familys_pooling():
    assert resolve_tap(_info("dinov2", prefix=1), "vision", layer=2) == Tap(2, "hidden_states", "cls")
    assert resolve_tap(_info("qwen3", causal=True), "text", layer=-3) == Tap(-3, "hidden_states", "last")
    st = _info("bert", {"sentence_embedding": 4}, sentence_pooling="cls")
    assert resolve_tap(st, "text", layer=1) == Tap(1, "hidden_states", "cls")
    assert resolve_tap(st, "text", tokens=True) == Tap(-1, "last_hidden_state", "tokens")
    assert resolve_tap(st, "text", pooling="mean") == Tap(-1, "last_hidden_state", "mean")
    assert resolve_tap(_info("convnext", {"pooler_output": 16}), "vision", pooling="none").source == "pooler_output"


def test_explicit_choices_are_kept_and_widths_follow_the_source():
    info = _info("clip_vision_model", {"pooler_output": 12, "projected": 6}, prefix=1)
    assert resolve_tap(info, "vision", source="hidden_states", pooling="mean") == Tap(-1, "hidden_states", "mean")
    assert (
        tap_width(info, Tap(-1, "hidden_states", "mean")) == 16 and tap_width(info, Tap(1, "hidden_states", "cls")) == 8
    )
    assert tap_width(info, resolve_tap(info, "vision", source="projected")) == 6
    assert tap_width(info, resolve_tap(info, "vision")) == 12


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"tokens": True, "pooling": "mean"},
            r"a token method needs vision_pooling='tokens' \(or 'auto'\), got 'mean'",
        ),
        ({"pooling": "tokens"}, r"vision_pooling='tokens' gives token sequences, which a pooled method cannot take"),
        ({"layer": 2, "source": "pooler_output"}, r"vision_source='pooler_output' exists only after the last layer"),
        ({"source": "projected"}, r"vision_source='projected': this siglip_vision_model encoder gives"),
        ({"pooling": "cls"}, r"vision_pooling='cls' but the vision encoder's last_hidden_state has no CLS token"),
        ({"layer": 5}, r"vision_layer=5 is out of range: the encoder exposes 5 hidden states \(valid indices -5..4\)"),
        ({"layer": "auto"}, r"vision_layer must be an int hidden-state index here, got 'auto'"),
        ({"source": "pooler"}, r"vision_source must be 'auto' or one of .*got 'pooler'"),
        (
            {"source": "pooler_output", "pooling": "mean"},
            r"is already one vector per input: its pooling must be 'none'",
        ),
    ],
)
def test_resolve_tap_refuses_what_cannot_be_read(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_tap(_info("siglip_vision_model", {"pooler_output": 16}), "vision", **kwargs)


# ---------------------------------------------------------------------------------------------- in the config
def test_a_config_without_tap_fields_reads_hidden_states_as_aligners_saved_before_taps():
    legacy = AlignerConfig(vision_num_layers=5, text_num_layers=4)  # what such a config.json gives
    assert legacy.tap("vision") == Tap(-1, "hidden_states", "cls")  # `auto`: its one CLS token (vision_has_cls)
    assert legacy.tap("text") == Tap(-1, "hidden_states", "mean")
    assert legacy.num_prefix_tokens("vision") == 1 and legacy.absolute_layer("vision") == 4
    no_cls = AlignerConfig(vision_has_cls=False, vision_layer=2)
    assert no_cls.tap("vision") == Tap(2, "hidden_states", "mean") and no_cls.num_prefix_tokens("vision") == 0


def test_a_config_records_a_tap_and_its_prefix_tokens():
    config = AlignerConfig(
        vision_source="last_hidden_state",
        vision_pooling="mean",
        vision_num_prefix_tokens=5,
        vision_num_layers=13,
        text_source="sentence_embedding",
        text_pooling="none",
        text_pipeline={"pooling_modes": ["cls"], "include_prompt": True, "steps": [], "max_seq_length": 512},
    )
    again = AlignerConfig.from_dict(config.to_dict())
    assert again.tap("vision") == Tap(-1, "last_hidden_state", "mean") and again.num_prefix_tokens("vision") == 5
    assert again.tap("text") == Tap(-1, "sentence_embedding", "none") and again.text_pipeline == config.text_pipeline
    assert again.absolute_layer("vision") == 12  # the feature cache keys the last hidden state by its index
    # `auto` in a config with a pooled source: nothing to pool
    assert AlignerConfig(vision_source="pooler_output").tap("vision") == Tap(-1, "pooler_output", "none")


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"vision_pooling": "last"},
            r"vision_pooling must be one of \('auto', 'cls', 'mean', 'max', 'tokens', 'none'\)",
        ),
        ({"text_pooling": "first"}, r"text_pooling must be one of \('auto', 'cls', 'mean', 'max', 'last', 'weighted"),
        ({"vision_source": "sentence_embedding"}, r"vision_source must be one of \('hidden_states', .*'projected'\)"),
        ({"text_source": "pooled"}, r"text_source must be one of \('hidden_states', .*'sentence_embedding'\), got"),
        ({"vision_source": "pooler_output", "vision_pooling": "mean"}, r"its pooling must be 'none', got 'mean'"),
        ({"vision_pooling": "none"}, r"vision pooling of source 'hidden_states' must be one of"),
        (
            {"vision_source": "last_hidden_state", "vision_layer": 3, "vision_num_layers": 5},
            r"vision_source='last_hidden_state' follows the last layer: vision_layer must be -1, got 3",
        ),
        ({"vision_num_prefix_tokens": -1}, r"vision_num_prefix_tokens must be an int >= 0 or None, got -1"),
        ({"text_pipeline": ["mean"]}, r"text_pipeline must be a dict or None, got \['mean'\]"),
    ],
)
def test_a_config_refuses_taps_that_cannot_be_read(fields, message):
    with pytest.raises(ValueError, match=message):
        AlignerConfig(**fields)


def test_taps_in_words_for_the_model_card():
    pipeline = {
        "pooling_modes": ["cls"],
        "steps": [
            {"type": "Dense", "in_features": 384, "out_features": 256, "activation": "Tanh"},
            {"type": "Normalize"},
        ],
    }
    assert describe_tap_in_words(Tap(-1, "sentence_embedding", "none"), 0, pipeline) == (
        "`sentence_embedding`: the repo's sentence-transformers pipeline (cls pooling → Dense 384→256 (Tanh) → "
        "Normalize)"
    )
    assert describe_tap_in_words(Tap(-1, "pooler_output", "none")) == (
        "`pooler_output`: the encoder's own pooled embedding"
    )
    assert describe_tap_in_words(Tap(-1, "last_hidden_state", "mean"), 5) == (
        "`last_hidden_state · mean`: the encoder's own final output, its 5 CLS / register tokens left out"
    )
    assert describe_tap_in_words(Tap(4, "hidden_states", "cls"), 1) == "`hidden_states[4] · cls`"
