"""The Gradio Space (examples/space/app.py) launched headless on 127.0.0.1 and queried with gradio_client: every tab
returns what the model itself computes. Skipped only when gradio (the `space` extra) is not installed."""

import importlib.util
import os
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from hf_align import AlignerModel
from hf_align.segmentation_inference import overlay_segmentation

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
pytestmark = pytest.mark.slow  # a Gradio server per module

APP_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "space", "app.py")
LABELS = ["cat", "a big red car", "a handwritten digit three"]
TEMPLATE = "a photo of {}."


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("hf_align_space_app", APP_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def query_image(random_images, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("query") / "query.png")
    random_images[0].save(path)
    return path


@pytest.fixture(scope="module")
def served(app, tiny_vit, tiny_bert, tmp_path_factory):
    """(demo, client) for a token_relative aligner, the app listening on a free local port."""
    folder = str(tmp_path_factory.mktemp("aligner"))
    AlignerModel.from_encoders(tiny_vit, tiny_bert, method="token_relative", num_anchors=16).save_pretrained(folder)
    images, captions = app.load_gallery(size=8)
    demo = app.AlignerDemo(folder, images, captions)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    blocks = demo.build()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield demo, gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        blocks.close()


def confidences(label_output: dict) -> dict[str, float]:
    return {c["label"]: c["confidence"] for c in label_output["confidences"]}


def test_space_classification_returns_the_model_scores(served, query_image):
    demo, client = served
    result = client.predict(gradio_client.handle_file(query_image), ", ".join(LABELS), TEMPLATE, api_name="/classify")
    model = demo.model
    with torch.no_grad():
        inputs = model.processor(
            images=[Image.open(query_image).convert("RGB")], text=[TEMPLATE.format(l) for l in LABELS]
        )
        expected = model(**inputs).logits_per_image[0].softmax(-1)
    got = confidences(result)
    torch.testing.assert_close(torch.tensor([got[label] for label in LABELS]), expected, atol=1e-6, rtol=0)
    assert result["label"] == LABELS[int(expected.argmax())]
    with pytest.raises(gradio_client.exceptions.AppError, match="Type at least one label"):
        client.predict(gradio_client.handle_file(query_image), " , ", TEMPLATE, api_name="/classify")


def test_space_retrieval_both_directions(served, query_image):
    demo, client = served
    found = client.predict("a handwritten digit three", 3, api_name="/search_images")
    expected = demo.image_search("a handwritten digit three", top_k=3)
    assert [item["caption"] for item in found] == [f"{r['score']:.3f}" for r in expected]
    for item, match in zip(found, expected):  # the right gallery images, in order (PNG round trip is lossless)
        assert np.array_equal(np.asarray(Image.open(item["image"]).convert("RGB")), np.asarray(match["image"]))

    captions = confidences(client.predict(gradio_client.handle_file(query_image), 4, api_name="/search_captions"))
    best = {}
    for r in demo.caption_search(Image.open(query_image).convert("RGB"), top_k=4):
        best.setdefault(r["text"], r["score"])
    assert captions == pytest.approx(best, abs=1e-6)


def test_space_segmentation_tab(served, query_image, app, tiny_vit, tiny_bert, tmp_path):
    demo, client = served
    assert "is a token method" in demo.segmentation_notice()
    overlay_path, areas = client.predict(
        gradio_client.handle_file(query_image), "cat, dog", TEMPLATE, True, api_name="/segment"
    )
    image = Image.open(query_image).convert("RGB")
    label_map = demo.model.segment(image, ["cat", "dog"], templates=[TEMPLATE], background="background")
    assert np.array_equal(
        np.asarray(Image.open(overlay_path).convert("RGB")), np.asarray(overlay_segmentation(image, label_map))
    )
    shares = torch.bincount(label_map.flatten(), minlength=3).double() / label_map.numel()
    assert confidences(areas) == pytest.approx(dict(zip(["cat", "dog", "background"], shares.tolist())), abs=1e-6)

    AlignerModel.from_encoders(tiny_vit, tiny_bert, method="linear", projection_dim=16).save_pretrained(tmp_path)
    pooled = app.AlignerDemo(str(tmp_path), *app.load_gallery(size=2))
    assert "**Method `linear` is not a token method**" in pooled.segmentation_notice()
