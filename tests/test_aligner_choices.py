"""`from_encoders` / `from_feature_dims` take the aligner's components explicitly (`method_config=`,
`regularizers=`, `similarity=`, `similarity_config=`) with `structure_weight=` as a checked shorthand, and keyword
routing never lets a regulariser capture a setting of the method."""

from dataclasses import dataclass

import pytest

from hf_align import AlignerModel
from hf_align.methods.linear import LinearConfig
from hf_align.regularizers import REGULARIZERS, Regularizer, RegularizerConfig


def test_method_config_as_a_dict_or_a_dataclass_equals_the_keywords():
    by_keyword = AlignerModel.from_feature_dims(6, 5, projection_dim=8, bias=True)
    by_dict = AlignerModel.from_feature_dims(6, 5, method_config={"projection_dim": 8, "bias": True})
    by_dataclass = AlignerModel.from_feature_dims(6, 5, method_config=LinearConfig(projection_dim=8, bias=True))
    mixed = AlignerModel.from_feature_dims(6, 5, method_config={"projection_dim": 8}, bias=True)
    for model in (by_dict, by_dataclass, mixed):
        assert model.config.method_config == by_keyword.config.method_config == {"projection_dim": 8, "bias": True}
        assert model.aligner.vision_head.weight.shape == (8, 6) and model.aligner.vision_head.bias is not None


def test_a_method_setting_given_two_ways_or_a_bad_method_config_is_refused():
    with pytest.raises(ValueError, match=r"\['projection_dim'\] given both in method_config and as keywords"):
        AlignerModel.from_feature_dims(6, 5, method_config={"projection_dim": 8}, projection_dim=16)
    with pytest.raises(
        ValueError, match=r"method_config must be a dict of 'linear'.s settings or a LinearConfig, got 8"
    ):
        AlignerModel.from_feature_dims(6, 5, method_config=8)
    with pytest.raises(TypeError, match=r"'linear' got unknown argument\(s\) \['width'\]"):
        AlignerModel.from_feature_dims(6, 5, method_config={"width": 8})


def test_structure_weight_is_a_checked_shorthand_for_the_regularizers_mapping():
    short = AlignerModel.from_feature_dims(6, 5, structure_weight=2.5)
    explicit = AlignerModel.from_feature_dims(6, 5, regularizers={"structure": {"weight": 2.5}})
    assert short.config.regularizers == explicit.config.regularizers == {"structure": {"weight": 2.5}}
    assert short.regularizers["structure"].weight == 2.5
    both = r"structure_weight=1.0 and regularizers\['structure'\]\['weight'\]=2.5 both set setting 'weight'"
    with pytest.raises(ValueError, match=both):
        AlignerModel.from_feature_dims(6, 5, structure_weight=1.0, regularizers={"structure": {"weight": 2.5}})


def test_the_similarity_head_is_chosen_explicitly():
    model = AlignerModel.from_feature_dims(
        6, 5, projection_dim=4, similarity="mlp", similarity_config={"hidden_dim": 3}
    )
    assert model.config.similarity == "mlp" and model.config.similarity_config == {"hidden_dim": 3}
    with pytest.raises(TypeError, match=r"unknown similarity_config key"):
        AlignerModel.from_feature_dims(6, 5, similarity="mlp", similarity_config={"hidden": 3})


@dataclass
class _NumConfig(RegularizerConfig):
    anchors: int = 1


class _Num(Regularizer):
    config_class = _NumConfig

    def forward(self, vision_features, text_features, image_embeds, text_embeds, image_ids=None):
        return image_embeds.sum() * 0


@pytest.fixture
def regulariser_named_num(monkeypatch):
    monkeypatch.setattr(REGULARIZERS, "_entries", dict(REGULARIZERS._entries))  # undone after the test
    REGULARIZERS.register("num", _Num)


def test_a_regulariser_never_captures_a_setting_of_the_method(regulariser_named_num):
    # `num_anchors` is asif's; before, the prefix `num_` routed it to the regulariser `num` as its `anchors`
    model = AlignerModel.from_feature_dims(6, 5, method="asif", num_anchors=3, topk=2)
    assert model.config.method_config["num_anchors"] == 3 and model.config.regularizers == {}
    routed = AlignerModel.from_feature_dims(6, 5, projection_dim=4, num_anchors=3)  # not linear's: the regulariser's
    assert routed.config.regularizers == {"num": {"anchors": 3}}
    with pytest.raises(TypeError, match=r"'num' got unknown argument\(s\) \['width'\]"):
        AlignerModel.from_feature_dims(6, 5, num_width=3)
