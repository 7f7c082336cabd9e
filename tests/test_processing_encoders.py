"""`AlignerProcessor` for the newer encoder families: decoder-only tokenizers, timm image processors, T5, SigLIP."""

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import AutoImageProcessor, AutoTokenizer, CLIPImageProcessorPil, PreTrainedTokenizerFast

from hf_align.model.processing import AlignerProcessor, prepare_tokenizer, timm_image_processor
from hf_align.testing import minilm_path, save_tiny_text_encoder, save_tiny_vision_encoder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("processing")
    return {
        "vit": save_tiny_vision_encoder(str(root / "vit")),
        "qwen3": save_tiny_text_encoder(str(root / "qwen3"), kind="qwen3"),
        "t5": save_tiny_text_encoder(str(root / "t5"), kind="t5"),
        "siglip_full": save_tiny_text_encoder(str(root / "siglip"), kind="siglip_full"),
    }


def test_decoder_tokenizer_gets_a_pad_token_and_keeps_its_padding_side(folders, tmp_path):
    raw = AutoTokenizer.from_pretrained(folders["qwen3"])
    assert raw.pad_token is None and raw.padding_side == "left"
    processor = AlignerProcessor.from_encoders(folders["vit"], folders["qwen3"])
    tokenizer = processor.tokenizer
    assert tokenizer.pad_token == "[SEP]" and tokenizer.padding_side == "left"
    batch = processor(text=["a cat", "a photo of a big dog"])
    short = batch["input_ids"][0]
    assert batch["attention_mask"][0].tolist()[:3] == [0, 0, 0] and short[:3].tolist() == [tokenizer.pad_token_id] * 3
    processor.save_pretrained(tmp_path)
    again = AlignerProcessor.from_pretrained(tmp_path)
    assert again.tokenizer.pad_token == "[SEP]" and again.tokenizer.padding_side == "left"
    assert torch.equal(again(text=["a cat", "a photo of a big dog"])["input_ids"], batch["input_ids"])


def test_a_tokenizer_with_nothing_to_pad_with_is_refused():
    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"a": 0, "cat": 1})))
    with pytest.raises(ValueError, match="has no pad, end-of-text or unknown token to pad batches with"):
        prepare_tokenizer(bare)


def test_t5_and_siglip_tokenizers_return_the_attention_mask(folders):
    for kind in ("t5", "siglip_full"):
        processor = AlignerProcessor.from_encoders(folders["vit"], folders[kind])
        batch = processor(text=["a cat", "a photo of a big dog"])
        assert batch["attention_mask"].shape == batch["input_ids"].shape
        assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()


def _images():
    rng = np.random.default_rng(0)
    # Sizes whose resized margins are even, where timm's and transformers' center crops take the same pixels.
    return [Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)) for size in ((40, 60, 3), (50, 36, 3))]


@pytest.mark.parametrize("crop_pct, mode", [(1.0, "center"), (0.875, "center"), (0.8, "squash")])
def test_timm_processor_becomes_timms_eval_transform(crop_pct, mode):
    timm = pytest.importorskip("timm")
    data_config = {
        "input_size": (3, 32, 32),
        "interpolation": "bicubic",
        "mean": (0.5, 0.4, 0.3),
        "std": (0.2, 0.25, 0.3),
        "crop_pct": crop_pct,
        "crop_mode": mode,
    }
    transform = timm.data.create_transform(**data_config, is_training=False)
    expected = torch.stack([transform(image) for image in _images()])
    processor = timm_image_processor(data_config)
    # transformers' PIL backend resizes exactly as timm's (PIL) transform; its torchvision backend to within 1/255.
    pil = CLIPImageProcessorPil(
        **{k: getattr(processor, k) for k in ("size", "crop_size", "resample")},
        image_mean=processor.image_mean,
        image_std=processor.image_std,
    )
    torch.testing.assert_close(pil(_images(), return_tensors="pt")["pixel_values"], expected, rtol=0, atol=1e-6)
    fast = processor(_images(), return_tensors="pt")["pixel_values"]
    assert (fast - expected).abs().max() < 0.02 / min(data_config["std"])


def test_timm_processor_saves_with_the_aligner(tmp_path):
    pytest.importorskip("timm")
    timm_folder = save_tiny_vision_encoder(str(tmp_path / "timm"), "timm")
    assert type(AutoImageProcessor.from_pretrained(timm_folder)).__name__ == "TimmWrapperImageProcessor"
    processor = AlignerProcessor.from_encoders(timm_folder, minilm_path())
    assert type(processor.image_processor).__name__ == "CLIPImageProcessor"
    pixels = processor(images=_images())["pixel_values"]
    assert pixels.shape == (2, 3, 32, 32)
    processor.save_pretrained(tmp_path / "aligner")
    again = AlignerProcessor.from_pretrained(tmp_path / "aligner")
    assert torch.equal(again(images=_images())["pixel_values"], pixels)


def test_timm_crop_modes_without_a_standard_equivalent_are_refused():
    config = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3}
    with pytest.raises(ValueError, match=r"timm crop_mode='border' with input size 32x32 has no standard"):
        timm_image_processor({**config, "crop_mode": "border"})
    with pytest.raises(ValueError, match=r"timm interpolation 'random' has no PIL equivalent"):
        timm_image_processor({**config, "interpolation": "random"})
