"""Untrusted inputs (issue #21, §2, §4, §5): images a processor would blow up, prompt templates that would build huge
strings, captions UTF-8 cannot encode, and what an upload sends. Each is refused by name (or handled by
`on_bad_sample`) on every path: map-style and streamed extraction, evaluation, the pipelines, segmentation, the
processor itself, `push` / `push_to_hub`."""

import io
import re
import string

import datasets
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import CLIPImageProcessor, ViTImageProcessor, pipeline
from transformers.image_utils import SizeDict

from hf_align import AlignerModel, AlignmentArguments, evaluate_zero_shot, train
from hf_align.features import BadSampleError, extract_features, skipped_samples
from hf_align.integrations.pipelines import RETRIEVAL_TASK, ZERO_SHOT_TASK, register_pipelines
from hf_align.model.hub import uploaded_files
from hf_align.model.processing import (
    MAX_ASPECT_RATIO,
    MAX_RESIZED_PIXELS,
    ImageSizeError,
    check_image_size,
    resized_image_size,
)
from hf_align.model.templates import check_template
from hf_align.testing import digits_dataset, save_tiny_vision_encoder

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IMAGE_FEATURES = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
STRIP = r"a 4096x1 px image has an aspect ratio of 4096:1, over the 20:1 that hf_align.model.processing.MAX_ASPECT_RATIO allows"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def strip_png() -> bytes:
    """A 4096×1 grey PNG: under 100 bytes on disk."""
    return png(Image.new("L", (4096, 1), 128))


def strip_image() -> Image.Image:
    return Image.open(io.BytesIO(strip_png()))


def noise(seed: int, size: int = 16) -> dict:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return {"bytes": png(Image.fromarray(pixels)), "path": None}


@pytest.fixture(scope="module")
def model(tiny_bert, tmp_path_factory):
    """An aligner on a tiny CLIP vision tower, whose processor resizes the shortest edge to 32 px (then crops)."""
    clip = save_tiny_vision_encoder(str(tmp_path_factory.mktemp("clip") / "clip"), "clip")
    return AlignerModel.from_encoders(clip, tiny_bert, projection_dim=8)


@pytest.fixture(scope="module")
def aligner_dir(model, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("aligner"))
    model.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------- §2 images
def test_a_94_byte_4096x1_png_would_become_917504x224_and_is_refused():
    data = strip_png()
    assert len(data) < 100 and Image.open(io.BytesIO(data)).size == (4096, 1)
    clip = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    # what the processor's resize would make of it: 224 rows of 917,504 pixels (205 million pixels, 2.4 GB as floats)
    assert resized_image_size(clip, 1, 4096) == (224, 917_504)
    with pytest.raises(ImageSizeError, match=f"^{STRIP}; the image processor would resize it to 917504x224 px$"):
        check_image_size(clip, strip_image())
    # the limit is the ratio: 20:1 passes, just over it does not, whatever the processor
    check_image_size(clip, Image.new("RGB", (220, 11)))
    fixed = ViTImageProcessor(size={"height": 32, "width": 32})
    with pytest.raises(ImageSizeError, match=r"^a 221x11 px image has an aspect ratio of 20.09:1, over the 20:1 "):
        check_image_size(fixed, Image.new("RGB", (221, 11)))
    # arrays are read as the processor reads them: (H, W, C) here
    with pytest.raises(ImageSizeError, match=r"^a 4096x4 px image"):
        check_image_size(fixed, np.zeros((4, 4096, 3), dtype=np.uint8))
    # a processor asking for a huge resize is capped by the pixels it would make, even of a square image
    huge = CLIPImageProcessor(size={"shortest_edge": 8192}, crop_size={"height": 8192, "width": 8192})
    with pytest.raises(
        ImageSizeError,
        match=r"^the image processor would resize a 10x10 px image to 8192x8192 px, 67,108,864 pixels, over "
        r"hf_align.model.processing.MAX_RESIZED_PIXELS=16,777,216$",
    ):
        check_image_size(huge, Image.new("RGB", (10, 10)))
    with pytest.raises(ImageSizeError, match=r"^empty image \(0x5 px\)$"):
        check_image_size(clip, np.zeros((5, 0, 3), dtype=np.uint8))


def test_extraction_makes_a_strip_image_a_bad_sample(model, tmp_path):
    images = [noise(0), {"bytes": strip_png(), "path": None}, noise(1)]
    dataset = datasets.Dataset.from_dict({"image": images, "caption": ["one", "two", "three"]}, features=IMAGE_FEATURES)
    # the tiny CLIP processor resizes the shortest edge to 32 px: the strip would become 131072x32 px
    with pytest.raises(
        BadSampleError, match=f"^row 1: 'image': {STRIP}; the image processor would resize it to 131072x32"
    ):
        extract_features(model, model.processor, dataset, cache_dir=tmp_path / "raise")
    features = extract_features(model, model.processor, dataset, cache_dir=tmp_path / "skip", on_bad_sample="skip")
    assert features["image_id"] == [0, 2]
    ((sample),) = skipped_samples(features)
    assert (sample["row"], sample["caption"]) == (1, None) and re.match(f"^'image': {STRIP}", sample["reason"])


def test_evaluation_pipelines_segmentation_and_processor_refuse_a_strip_image(model, aligner_dir, random_images):
    register_pipelines()
    strip = strip_image()
    classifier = pipeline(ZERO_SHOT_TASK, model=aligner_dir)
    with pytest.raises(ImageSizeError, match=f"^{STRIP}"):
        classifier(strip, candidate_labels=["cat", "dog"])
    retriever = pipeline(RETRIEVAL_TASK, model=aligner_dir)
    with pytest.raises(ImageSizeError, match=f"^image 1: {STRIP}"):
        retriever.set_gallery(images=[random_images[0], strip])
    retriever.set_gallery(texts=["a cat", "a dog"])
    with pytest.raises(ImageSizeError, match=f"^{STRIP}"):
        retriever(strip)
    with pytest.raises(ImageSizeError, match=rf"^images\[0\]: {STRIP}"):
        model.segment(strip, ["cat", "dog"], templates=["{}"])
    with pytest.raises(ImageSizeError, match=rf"^images\[1\]: {STRIP}"):
        model.processor(images=[random_images[0], strip], text=["a cat"])
    labelled = datasets.Dataset.from_dict(
        {"image": [random_images[0], random_images[1], strip], "label": [0, 1, 0]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])}),
    )
    with pytest.raises(ImageSizeError, match=f"^image 2: {STRIP}"):
        evaluate_zero_shot(model, model.processor, labelled, templates=["a photo of {}."], batch_size=2)


# ---------------------------------------------------------------------------------------------- §2 prompts
@pytest.mark.parametrize(
    "template", ["{:>1500000000}", "{} {:>99999}", "{!r}", "{0}", "{0.__class__}", "{}{}", "{:}", "{{}}", "none", "{"]
)
def test_a_template_needs_exactly_one_bare_placeholder(template):
    message = re.escape(f"template={template!r} must hold exactly one bare '{{}}' for the class name")
    with pytest.raises(ValueError, match=f"^{message}, with no field name, conversion or format spec"):
        check_template(template)


def test_good_templates_pass_and_format_as_written():
    for template, prompt in [("{}", "cat"), ("a photo of a {}.", "a photo of a cat."), ("{{x}} {}", "{x} cat")]:
        assert check_template(template).format("cat") == prompt
    with pytest.raises(
        ValueError, match=r"^templates\[2\] must be a string with one '\{\}' for the class name, got int"
    ):
        check_template(3, "templates[2]")
    with pytest.raises(ValueError, match=r"^template='x{3,}\.\.\.x{3,}' must hold") as refused:
        check_template("x" * 1_000_000)  # quoted shortened: an error does not copy a huge template
    assert len(str(refused.value)) < 500


def test_zero_shot_entry_points_refuse_a_format_spec_before_building_prompts(model, aligner_dir, random_images):
    register_pipelines()
    classifier = pipeline(ZERO_SHOT_TASK, model=aligner_dir)
    # today each of these pads every prompt to 100k characters ("{{}}" even passes a test for the substring "{}")
    with pytest.raises(ValueError, match=r"^hypothesis_template='\{:>99999\}' must hold exactly one bare"):
        classifier(random_images[0], candidate_labels=["cat"], hypothesis_template="{:>99999}")
    digits = digits_dataset(4)
    with pytest.raises(ValueError, match=r"^templates\[1\]='\{\{\}\}\{:>99999\}' must hold exactly one bare"):
        evaluate_zero_shot(model, model.processor, digits, templates=["{}", "{{}}{:>99999}"])
    with pytest.raises(ValueError, match=r"^templates\[0\]='\{0.__class__\}' must hold exactly one bare"):
        model.segment(random_images[0], ["cat"], templates=["{0.__class__}"])


@torch.no_grad()
def test_labels_longer_than_the_text_encoder_are_truncated(model, aligner_dir, random_images):
    register_pipelines()
    long_label = "cat " * 300  # 300+ tokens; the tiny text encoder has 128 positions
    labels = [long_label, "dog"]
    result = pipeline(ZERO_SHOT_TASK, model=aligner_dir)(
        random_images[0], candidate_labels=labels, hypothesis_template="{}"
    )
    tokens = model.processor.tokenizer(labels, padding=True, truncation=True, max_length=128, return_tensors="pt")
    assert tokens["input_ids"].shape[1] == 128
    pixels = model.processor.image_processor(images=[random_images[0]], return_tensors="pt")["pixel_values"]
    expected = model(pixel_values=pixels, **tokens).logits_per_image[0].softmax(-1)
    scores = {r["label"]: r["score"] for r in result}
    torch.testing.assert_close(torch.tensor([scores[label] for label in labels]), expected, rtol=0, atol=1e-5)
    # segmentation's class prototypes go through the same truncation
    assert model.segment(random_images[0], [long_label, "dog"], templates=["{}"]).shape == (32, 32)


# ---------------------------------------------------------------------------------------------- §4 captions
def test_a_lone_surrogate_caption_is_a_bad_sample_map_style(model, tmp_path):
    # Arrow cannot store a lone surrogate, but a transform applied on read can yield one
    def surrogates(batch):
        return {**batch, "caption": [c.replace("#", "\ud800") for c in batch["caption"]]}

    images = [noise(0), noise(1), noise(2)]
    source = datasets.Dataset.from_dict({"image": images, "caption": ["one", "t#wo", "three"]}, features=IMAGE_FEATURES)
    dataset = source.with_transform(surrogates)
    with pytest.raises(
        BadSampleError,
        match=r"^row 1: 'caption': the caption cannot be encoded as UTF-8 \(surrogates not allowed: '\\ud800' at "
        r"character 1\)",
    ):
        extract_features(model, model.processor, dataset, cache_dir=tmp_path / "raise")
    features = extract_features(model, model.processor, dataset, cache_dir=tmp_path / "skip", on_bad_sample="skip")
    assert features["image_id"] == [0, 2]
    assert [(s["row"], s["caption"]) for s in skipped_samples(features)] == [(1, None)]


def test_streamed_extraction_skips_strip_images_and_surrogate_captions(model, tmp_path):
    rows = [
        (noise(0), "fine"),
        ({"bytes": strip_png(), "path": None}, "a strip"),
        (noise(1), "bad \ud800 caption"),
        (noise(2), "also fine"),
    ]

    def generate():
        for image, caption in rows:
            yield {"image": image, "caption": caption}

    stream = datasets.IterableDataset.from_generator(generate, features=IMAGE_FEATURES)
    with pytest.raises(BadSampleError, match=f"^shard 0, row 1: 'image': {STRIP}"):
        extract_features(model, model.processor, stream, batch_size=2, cache_path=tmp_path / "raise")
    features = extract_features(
        model, model.processor, stream, batch_size=2, cache_path=tmp_path / "skip", on_bad_sample="skip"
    )
    assert features["image_id"] == [0, 3]
    skipped = skipped_samples(features)
    assert [(s["shard"], s["row"], s["caption"]) for s in skipped] == [(0, 1, None), (0, 2, None)]
    assert re.match(f"^'image': {STRIP}", skipped[0]["reason"])
    assert skipped[1]["reason"] == (
        "'caption': the caption cannot be encoded as UTF-8 (surrogates not allowed: '\\ud800' at character 4)"
    )
    # the surviving rows are what they are without the bad ones beside them
    clean = datasets.Dataset.from_dict(
        {"image": [rows[0][0], rows[3][0]], "caption": [rows[0][1], rows[3][1]]}, features=IMAGE_FEATURES
    )
    expected = extract_features(model, model.processor, clean, cache_dir=tmp_path / "clean")
    for column in ("vision_layer_2", "text_layer_2"):
        torch.testing.assert_close(torch.tensor(features[column]), torch.tensor(expected[column]), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- §5 uploads
def test_uploaded_files_are_the_allow_list_of_the_aligners_own_files(tmp_path):
    allowed = [
        "README.md",
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder/modules.json",
        "text_encoder/sentence_bert_config.json",
        "text_encoder/1_Pooling/config.json",
        "text_encoder/2_Dense/config.json",
        "text_encoder/2_Dense/model.safetensors",
        "text_encoder_lora/adapter_config.json",
        "text_encoder_lora/adapter_model.safetensors",
        "vision_encoder/config.json",
        "vision_encoder/model.safetensors",
    ]
    left_out = [
        "hf_align/events.out.tfevents.1796559726.host.6397.0",  # tracker logs: host name, pid
        "hf_align/1796559726.74/hparams.yml",  # local paths
        "runs/events.out",
        "checkpoint-4/aligner.safetensors",
        "checkpoint-4/optimizer.pt",
        "cache/data-00000-of-00001.arrow",
        ".cache/lock",
        "pytorch_model.bin",  # a pickle, even where weights are allowed
        "training_args.bin",
        "notes.txt",
        "vision_encoder/checkpoint-3/config.json",
        "vision_encoder/hparams.yml",
        "text_encoder_lora/adapter_model.bin",
        "text_encoder/2_Dense/pytorch_model.bin",
        "vision_encoder_lora/nested/adapter_config.json",
    ]
    for path in allowed + left_out:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"x")
    assert uploaded_files(tmp_path) == allowed


@pytest.mark.slow  # a stand-in Hub server
def test_push_after_training_uploads_exactly_the_aligners_files(model, tmp_path, monkeypatch):
    from hub_server import serving

    from hf_align.commands.cli import main as cli_main
    from hf_align.model.hub import upload_aligner

    output_dir = tmp_path / "run"
    features = extract_features(model, model.processor, digits_dataset(24), cache_dir=tmp_path / "cache")
    args = AlignmentArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        max_steps=4,
        save_steps=2,
        logging_steps=1,
        mixed_precision="no",
        report_to=["tensorboard"],
    )
    train(model, features, args)
    written = {str(p.relative_to(output_dir)) for p in output_dir.rglob("*") if p.is_file()}
    assert any(p.startswith("hf_align/") and "tfevents" in p for p in written)
    assert any(p.endswith("hparams.yml") for p in written) and any(p.startswith("checkpoint-") for p in written)
    expected = {"README.md", "config.json", "model.safetensors", "processor_config.json", "tokenizer.json"}
    expected |= {"tokenizer_config.json"}
    with serving(monkeypatch) as hub:
        assert cli_main(["push", "--model_dir", str(output_dir), "--repo_id", "me/cli"]) == 0
        upload_aligner(model, output_dir, "me/api")
        model.save_pretrained(output_dir, push_to_hub=True, repo_id="me/saved")
        model.push_to_hub("me/pushed")
        for repo in ("me/cli", "me/api", "me/saved", "me/pushed"):
            assert set(hub.files(repo)) == expected, repo
        assert hub.files("me/api")["model.safetensors"] == (output_dir / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------- §6 properties
def _one_bare_placeholder(template: str) -> bool:
    """The reference reading, scanned left to right: `{{` and `}}` are literal braces, `{}` the placeholder, any
    other brace makes the template invalid."""
    placeholders, i = 0, 0
    while i < len(template):
        pair = template[i : i + 2]
        if pair in ("{{", "}}"):
            i += 2
        elif pair == "{}":
            placeholders, i = placeholders + 1, i + 2
        elif template[i] in "{}":
            return False
        else:
            i += 1
    return placeholders == 1


templates = st.text(alphabet="{}:!>0rsx .", max_size=14) | st.builds(
    "{}{{:>{}}}{}".format, st.text(alphabet="{}a ", max_size=4), st.integers(0, 10**12), st.text(max_size=4)
)


@FAST
@given(template=templates, label=st.text(max_size=30))
def test_templates_are_accepted_iff_they_hold_one_bare_placeholder(template, label):
    if _one_bare_placeholder(template):
        assert check_template(template) == template
        # Python's own parser sees a single bare field, and the prompt is never longer than template + label
        assert [f[1:] for f in string.Formatter().parse(template) if f[1] is not None] == [("", "", None)]
        assert len(template.format(label)) <= len(template) + len(label)
    else:
        with pytest.raises(ValueError, match=r"must hold exactly one bare '\{\}' for the class name"):
            check_template(template)


def size_settings(largest: int):
    """The `size` settings transformers' resize knows, each edge up to `largest` px."""
    edge = st.integers(1, largest)
    return st.one_of(
        st.builds(lambda s: SizeDict(shortest_edge=s), edge),
        st.builds(lambda s, m: SizeDict(shortest_edge=s, longest_edge=s + m), edge, st.integers(0, 2 * largest)),
        st.builds(lambda h, w: SizeDict(height=h, width=w), edge, edge),
        st.builds(lambda h, w: SizeDict(max_height=h, max_width=w), edge, edge),
    )


def clip_processor(size: SizeDict) -> CLIPImageProcessor:
    return CLIPImageProcessor(size={k: v for k, v in vars(size).items() if v is not None})


@FAST
@given(size=size_settings(1024), height=st.integers(4, 10**6), width=st.integers(4, 10**6))
def test_an_image_is_refused_or_resized_within_the_caps(size, height, width):
    processor = clip_processor(size)
    # a zero-stride (H, W, 3) array: an image of any size at no cost
    image = np.broadcast_to(np.uint8(0), (height, width, 3))
    try:
        check_image_size(processor, image)
    except ImageSizeError as err:
        assert re.match(r"^(a \d+x\d+ px image has an aspect ratio|the image processor would resize)", str(err))
        return
    resized = resized_image_size(processor, height, width)
    assert max(height, width) <= MAX_ASPECT_RATIO * min(height, width)
    assert resized[0] * resized[1] <= MAX_RESIZED_PIXELS


@settings(max_examples=25, deadline=None)
@given(size=size_settings(64), height=st.integers(1, 48), width=st.integers(1, 48))
def test_the_computed_resize_is_the_processors_own(size, height, width):
    processor = clip_processor(size)
    resized = processor.resize(torch.zeros(3, height, width), processor.size)
    assert tuple(resized.shape[-2:]) == resized_image_size(processor, height, width)
