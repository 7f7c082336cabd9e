"""The real pretrained vision tower: ImageNet EfficientNet-Lite0, converted offline into a transformers folder."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from transformers import AutoImageProcessor

from hf_align.encoders import load_encoder, probe_vision
from hf_align.encoders.loading import vision_taps
from hf_align.encoders.taps import Tap, resolve_tap
from hf_align.testing import EFFICIENTNET_LITE0_FILES, efficientnet_lite0_path, efficientnet_lite0_state_dict

DAISY, PALACE, BELL_COTE = 985, 698, 442  # ImageNet class indices


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    return efficientnet_lite0_path(tmp_path_factory.mktemp("cache"))


def test_the_folder_is_hub_format_safetensors_only(lite0):
    assert sorted(os.listdir(lite0)) == sorted(EFFICIENTNET_LITE0_FILES)
    with open(os.path.join(lite0, "config.json")) as handle:
        config = json.load(handle)
    assert config["model_type"] == "efficientnet" and config["hidden_act"] == "relu6"
    assert (config["width_coefficient"], config["depth_coefficient"], config["hidden_dim"]) == (1.0, 1.0, 1280)
    with open(os.path.join(lite0, "preprocessor_config.json")) as handle:
        processor = json.load(handle)
    assert processor["image_mean"] == processor["image_std"] == [0.5, 0.5, 0.5]
    assert processor["size"] == {"height": 224, "width": 224}


def test_sample_photos_are_classified_sensibly(lite0):
    encoder = load_encoder("vision", lite0, source="auto")
    info = probe_vision(encoder, lite0)
    tap = resolve_tap(info, "vision")
    assert tap == Tap(-1, "pooler_output", "none") and info.output_sizes["pooler_output"] == 1280
    assert info.hidden_sizes[-1] == 320  # the last block's map, which the aligner read before taps
    processor = AutoImageProcessor.from_pretrained(lite0)
    china, flower = (Image.fromarray(image) for image in load_sample_images().images)
    pixels = processor([china, flower], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        [(embedding, _)] = vision_taps(encoder, pixels, [tap])
    # The package's own classifier on the converted tower's 1280-d embedding.
    weights = efficientnet_lite0_state_dict()
    logits = embedding @ weights["_fc.weight"].T + weights["_fc.bias"]
    top1 = logits.argmax(dim=-1).tolist()
    assert top1[0] in (PALACE, BELL_COTE), top1
    assert top1[1] == DAISY, top1


def test_conversion_runs_once_and_replaces_an_incomplete_folder(lite0, tmp_path):
    stamp = os.path.getmtime(os.path.join(lite0, "model.safetensors"))
    assert efficientnet_lite0_path(os.path.dirname(lite0)) == lite0
    assert os.path.getmtime(os.path.join(lite0, "model.safetensors")) == stamp  # reused, not rewritten
    broken = tmp_path / "efficientnet-lite0"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    path = efficientnet_lite0_path(tmp_path)
    assert path == str(broken) and sorted(os.listdir(path)) == sorted(EFFICIENTNET_LITE0_FILES)
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []  # no partial folder left behind
    reference = load_encoder("vision", lite0)
    again = load_encoder("vision", path)
    pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32))
    with torch.no_grad():
        assert torch.equal(reference(pixel_values=pixels).pooler_output, again(pixel_values=pixels).pooler_output)
