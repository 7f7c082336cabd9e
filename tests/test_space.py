"""The Gradio Space (examples/space/app.py) launched headless on 127.0.0.1 and queried with gradio_client: every tab
returns what the model itself computes, the classification chart is the top 5 of the softmax over all labels, and the
app refuses to start without an aligner, saying how to make one (`hf-align quickstart`). The served aligners are tiny
ones for speed; the documented path (`--model hf_align_quickstart/aligner`) runs as a subprocess. Skipped only when
gradio (the `space` extra) is not installed."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from hf_align import AlignerModel
from hf_align.model.configuration import TASK_ZERO_SHOT
from hf_align.model.segmentation import overlay_segmentation
from hf_align.testing import DIGIT_NAMES

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
pytestmark = pytest.mark.slow  # Gradio servers

APP_PATH = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "examples", "space", "app.py"))
TEMPLATE = "a handwritten digit {}"


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("hf_align_space_app", APP_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture(scope="module")
def query_image(random_images, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("query") / "query.png")
    random_images[0].save(path)
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(app, tiny_vit, tiny_bert, tmp_path_factory):
    """(demo, client) for a token_relative aligner, the app listening on a free local port."""
    folder = str(tmp_path_factory.mktemp("aligner"))
    AlignerModel.from_encoders(tiny_vit, tiny_bert, method="token_relative", num_anchors=16).save_pretrained(folder)
    demo = app.AlignerDemo(folder, app.load_gallery(size=8))
    port = free_port()
    blocks = demo.build()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield demo, gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        blocks.close()


@pytest.fixture(scope="module")
def pooled_folder(tiny_vit, tiny_bert, tmp_path_factory):
    """A linear aligner whose config records a training run and a zero-shot evaluation."""
    model = AlignerModel.from_encoders(tiny_vit, tiny_bert, method="linear", projection_dim=16)
    model.model_card_data.set_training_run(
        trainer="hf_align.train",
        train_pairs=1437,
        eval_pairs=0,
        global_step=240,
        best_step=None,
        runtime_s=12.5,
        device="cpu",
        mixed_precision="no",
        training_args={},
        final_eval={},
        training_logs=[],
    )
    model.model_card_data.add_evaluation(
        TASK_ZERO_SHOT, {"top5": 97.5, "top1": 83.14159, "mean_per_class_recall": 82.9}, dataset_name="sklearn/digits"
    )
    folder = str(tmp_path_factory.mktemp("pooled"))
    model.save_pretrained(folder)
    return folder


def confidences(label_output: dict) -> list[tuple[str, float]]:
    return [(c["label"], c["confidence"]) for c in label_output["confidences"]]


def expected_top5(model, image_path: str, labels: list[str]) -> list[tuple[str, float]]:
    """The 5 best labels of the softmax over all of `labels` of the model's own logits, best first."""
    with torch.no_grad():
        inputs = model.processor(
            images=[Image.open(image_path).convert("RGB")], text=[TEMPLATE.format(label) for label in labels]
        )
        probs = model(**inputs).logits_per_image[0].softmax(-1)
    top = probs.topk(5)
    return [(labels[i], p) for p, i in zip(top.values.tolist(), top.indices.tolist())]


def test_space_classification_shows_the_top5_of_the_model_scores(served, query_image):
    demo, client = served
    assert demo.gallery.labels == DIGIT_NAMES and demo.gallery.template == TEMPLATE  # the quickstart's classes
    result = client.predict(
        gradio_client.handle_file(query_image), ", ".join(DIGIT_NAMES), TEMPLATE, api_name="/classify"
    )
    got = confidences(result)
    expected = expected_top5(demo.model, query_image, DIGIT_NAMES)
    assert [label for label, _ in got] == [label for label, _ in expected]  # 5 of the 10 labels, best first
    torch.testing.assert_close(
        torch.tensor([p for _, p in got]), torch.tensor([p for _, p in expected]), atol=1e-6, rtol=0
    )
    assert result["label"] == expected[0][0]
    with pytest.raises(gradio_client.exceptions.AppError, match="Type at least one label"):
        client.predict(gradio_client.handle_file(query_image), " , ", TEMPLATE, api_name="/classify")


def test_space_retrieval_both_directions(served, query_image):
    demo, client = served
    found = client.predict("a handwritten digit three", 3, api_name="/search_images")
    expected = demo.image_search("a handwritten digit three", top_k=3)
    assert [item["caption"] for item in found] == [f"{r['score']:.3f}" for r in expected]
    for item, match in zip(found, expected):  # the right gallery images, in order (PNG round trip is lossless)
        assert np.array_equal(np.asarray(Image.open(item["image"]).convert("RGB")), np.asarray(match["image"]))

    captions = dict(confidences(client.predict(gradio_client.handle_file(query_image), 4, api_name="/search_captions")))
    best = {}
    for r in demo.caption_search(Image.open(query_image).convert("RGB"), top_k=4):
        best.setdefault(r["text"], r["score"])
    assert captions == pytest.approx(best, abs=1e-6)


def test_space_segmentation_tab(served, query_image, app, pooled_folder):
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
    assert dict(confidences(areas)) == pytest.approx(dict(zip(["cat", "dog", "background"], shares.tolist())), abs=1e-6)

    pooled = app.AlignerDemo(pooled_folder, app.load_gallery(size=2))
    assert "**Method `linear` is not a token method**" in pooled.segmentation_notice()


def test_space_header_says_what_the_aligner_records(served, app, pooled_folder, tiny_vit, tiny_bert):
    demo, _ = served
    untrained = demo.description()
    assert untrained.startswith(f"Aligner `{demo.model_name}`: vision encoder `{tiny_vit}`, text encoder `{tiny_bert}`")
    assert "**No training run is recorded in this aligner's config**" in untrained

    trained = app.AlignerDemo(pooled_folder, app.load_gallery(size=2)).description().split("\n\n")
    assert trained[1:] == [
        "Trained with `hf_align.train` for 240 steps on 1,437 image–text pairs.",
        "Zero-shot image classification on sklearn/digits: Top-1 accuracy 83.14, Top-5 accuracy 97.5, "
        "Mean per-class recall 82.9.",
    ]


def test_folder_gallery_takes_captions_and_labels_from_file_names(app, random_images, tmp_path):
    for name, image in zip(["red_car.png", "blue-car.jpg", "red_car_2.png"], random_images):
        image.save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    gallery = app.load_gallery(str(tmp_path))
    assert gallery.captions == ["blue car", "red car", "red car 2"]
    assert gallery.labels == ["blue car", "red car", "red car 2"] and gallery.template == "a photo of {}."
    assert len(gallery.images) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"gallery folder '.*empty' holds no image \(\.png, \.jpg"):
        app.load_gallery(str(empty))


def test_app_refuses_to_start_without_a_trained_aligner(app, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(app.MODEL_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        app.main([])
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert "no aligner given: train one with `hf-align quickstart`" in message
    assert "`python app.py --model hf_align_quickstart/aligner`" in message and "HF_ALIGN_MODEL" in message

    with pytest.raises(
        ValueError,
        match=r"^folder './hf_align_quickstart/aligner/' does not exist here: train one with `hf-align quickstart`",
    ):
        app.required_model("./hf_align_quickstart/aligner/")
    (tmp_path / "hf_align_quickstart" / "aligner").mkdir(parents=True)
    assert app.required_model("hf_align_quickstart/aligner") == "hf_align_quickstart/aligner"
    assert app.required_model("user/aligner") == "user/aligner"  # a Hub id is left to the loader


def test_app_script_serves_the_quickstart_folder(app, pooled_folder, query_image, tmp_path):
    """`python app.py --model hf_align_quickstart/aligner`, as the README says, run from where the quickstart ran."""
    quickstart = tmp_path / "hf_align_quickstart" / "aligner"
    quickstart.parent.mkdir()
    os.symlink(pooled_folder, quickstart)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, APP_PATH, "--model", "hf_align_quickstart/aligner", "--port", str(port)],
        cwd=tmp_path,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.communicate()[0]
            try:
                client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except httpx.ConnectError:  # not listening yet
                assert time.monotonic() < deadline, "the app did not start within 300 s"
                time.sleep(1)
        result = client.predict(
            gradio_client.handle_file(query_image), ", ".join(DIGIT_NAMES), TEMPLATE, api_name="/classify"
        )
        model = AlignerModel.from_pretrained(pooled_folder)
        expected = expected_top5(model, query_image, DIGIT_NAMES)
        assert [label for label, _ in confidences(result)] == [label for label, _ in expected]
        assert [p for _, p in confidences(result)] == pytest.approx([p for _, p in expected], abs=1e-6)
    finally:
        server.terminate()
        server.wait(timeout=60)


# ---------------------------------------------------------------------------------------------- untrusted requests
def test_space_caps_the_labels_and_template_of_a_request(app):
    assert app.parse_labels(" cat, dog ,, ") == ["cat", "dog"]
    too_many = ",".join(f"l{i}" for i in range(app.MAX_LABELS + 1))
    with pytest.raises(gr.Error, match=f"Give at most {app.MAX_LABELS} labels, got {app.MAX_LABELS + 1}"):
        app.parse_labels(too_many)
    with pytest.raises(gr.Error, match=f"Labels can have at most {app.MAX_LABEL_CHARS} characters; 1 label"):
        app.parse_labels("cat, " + "x" * (app.MAX_LABEL_CHARS + 1))
    with pytest.raises(gr.Error, match=f"Too much text for {app.MAX_LABELS} labels"):
        app.parse_labels("a," * 1_000_000)
    assert app.parse_template("") == "{}" and app.parse_template(TEMPLATE) == TEMPLATE
    with pytest.raises(gr.Error, match=r"prompt template='\{:>1500000000\}' must hold exactly one bare '\{\}'"):
        app.parse_template("{:>1500000000}")
    with pytest.raises(
        gr.Error, match=f"at most {app.MAX_TEMPLATE_CHARS} characters, got {app.MAX_TEMPLATE_CHARS + 1}"
    ):
        app.parse_template("{}" + "x" * (app.MAX_TEMPLATE_CHARS - 1))


def test_space_refuses_a_strip_image_a_bad_template_and_a_huge_query(served, app):
    demo, client = served
    strip = Image.new("L", (4096, 1), 128)
    refused = "This image cannot be used: a 4096x1 px image has an aspect ratio of 4096:1, over the 20:1"
    with pytest.raises(gr.Error, match=refused):
        demo.classify(strip, "cat, dog", TEMPLATE)
    with pytest.raises(gr.Error, match=refused):
        demo.search_captions(strip, 3)
    with pytest.raises(gr.Error, match=refused):
        demo.segment(strip, "cat, dog", TEMPLATE, False)
    square = Image.new("RGB", (32, 32), (128, 128, 128))
    for call in (
        lambda: demo.classify(square, "cat", "{:>1500000000}"),
        lambda: demo.segment(square, "cat", "{0}", False),
    ):
        with pytest.raises(gr.Error, match=r"must hold exactly one bare '\{\}'"):
            call()
    with pytest.raises(gr.Error, match=f"at most {app.MAX_QUERY_CHARS} characters, got {app.MAX_QUERY_CHARS + 1}"):
        demo.search_images("x" * (app.MAX_QUERY_CHARS + 1), 3)


def test_space_starts_when_the_training_summary_is_malformed(app, tiny_vit, tiny_bert, tmp_path):
    folder = tmp_path / "aligner"
    AlignerModel.from_encoders(tiny_vit, tiny_bert, method="linear", projection_dim=8).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["training_summary"] = {
        "global_step": "many",
        "trainer": 3,
        "evaluations": [{"task": "nope", "dataset": "x", "metrics": "high"}],
    }
    (folder / "config.json").write_text(json.dumps(config))
    demo = app.AlignerDemo(str(folder), app.load_gallery(size=2))
    demo.build()  # the page, header included, is made
    notice = (
        "**This aligner's config holds a malformed training summary**, so its training run and evaluations are not "
        "shown."
    )
    assert demo.description().split("\n\n")[1:] == [notice]
    for summary in (
        {"global_step": 3},  # no trainer
        {"evaluations": "x"},
        {"evaluations": [{"dataset": "x", "task": TASK_ZERO_SHOT, "metrics": {"top1": 1.0}}]},
        {"evaluations": [{"dataset": {}, "task": TASK_ZERO_SHOT, "metrics": {"top1": "high"}}]},
        {"evaluations": [{"dataset": {}, "task": "nope", "metrics": {}}]},
    ):
        assert app.training_lines(summary) == [notice], summary
    assert app.training_lines({}) == [
        "**No training run is recorded in this aligner's config**: unless it was trained some other way, its scores "
        "are those of an untrained aligner."
    ]
