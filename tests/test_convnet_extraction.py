"""Extraction runs a convolutional tower channels-last on CPU (faster depthwise convolutions), gives the tower back
in the default memory format, and stores the features the plain NCHW forward gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_align import AlignerModel
from hf_align.encoders.loading import read_tap
from hf_align.features import extract_features, features_for
from hf_align.features.encode import channels_last_convnet
from hf_align.testing import digits_dataset, efficientnet_lite0_path, minilm_path


def conv_weights(encoder):
    return [m.weight for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]


@pytest.fixture(scope="module")
def lite0():
    return AlignerModel.from_encoders(efficientnet_lite0_path(), minilm_path(), projection_dim=8)


def test_a_convnet_runs_channels_last_inside_and_is_given_back_contiguous(lite0):
    tower = lite0.vision_model
    with channels_last_convnet(tower, torch.device("cpu")) as memory_format:
        assert memory_format == torch.channels_last
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(tower))
    assert all(w.is_contiguous() for w in conv_weights(tower))


def test_a_transformer_tower_is_left_alone(tiny_vit):
    model = AlignerModel.from_encoders(tiny_vit, minilm_path(), projection_dim=8)
    (patch_embedding,) = conv_weights(model.vision_model)
    with channels_last_convnet(model.vision_model, torch.device("cpu")) as memory_format:
        assert memory_format == torch.contiguous_format and patch_embedding.is_contiguous()


def test_extracted_convnet_features_equal_the_plain_forward(lite0, tmp_path):
    data = digits_dataset(4, image_size=32)
    features = extract_features(lite0, lite0.processor, data, cache_path=str(tmp_path / "cache"), batch_size=4)
    stored = np.stack(features_for(lite0, features).with_format("numpy")["vision_features"])
    pixels = lite0.processor.image_processor(images=[im.convert("RGB") for im in data["image"]], return_tensors="pt")
    with torch.no_grad():
        outputs = lite0.vision_outputs(pixels["pixel_values"])
    expected = read_tap(outputs, lite0.config.tap("vision"), 0, dtype=torch.float32)[0].numpy()
    assert stored.shape == expected.shape
    np.testing.assert_allclose(stored, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert all(w.is_contiguous() for w in conv_weights(lite0.vision_model))
