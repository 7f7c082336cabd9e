"""Gradio demo (and Hugging Face Space) for a trained hf_align aligner.

The app opens on the aligner it is given, never on an untrained one. The first to try is the quickstart's: the
ImageNet-trained EfficientNet-Lite0 and all-MiniLM-L6-v2 aligned on scikit-learn's handwritten digits, all offline:

    hf-align quickstart                                  # trains it, saves hf_align_quickstart/aligner
    python app.py --model hf_align_quickstart/aligner    # http://127.0.0.1:7860
    python app.py --model user/aligner --gallery ./my_images --port 7861   # any aligner; or set HF_ALIGN_MODEL

Tabs: zero-shot classification (an image + labels -> the top-5 scores as bars; the page opens on a gallery image
already classified), retrieval over a small gallery (text -> images, image -> captions) and zero-shot segmentation
(the label map over the image, `AlignerModel.segment`: made for token methods such as `token_relative`).

The gallery defaults to 24 images of scikit-learn's bundled handwritten digits (captioned "a handwritten digit
three", ...) with the ten digit names as labels; `--gallery DIR` uses the images of a folder instead, captioned and
labelled by their file names ("red_car.jpg" -> "red car").

What a visitor sends is bounded before any model runs: at most `MAX_LABELS` labels of `MAX_LABEL_CHARS` characters,
a template of at most `MAX_TEMPLATE_CHARS` with exactly one bare `{}` (`hf_align.model.templates.check_template`), a
text query of at most `MAX_QUERY_CHARS`, and images the image processor would not blow up
(`hf_align.model.processing.check_image_size`). The header reads the aligner's `training_summary` defensively: a
malformed one is reported there, and the app still starts.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import gradio as gr
import torch
from PIL import Image
from transformers import pipeline

from hf_align.experiments.quickstart import QuickstartArguments
from hf_align.integrations.pipelines import RETRIEVAL_TASK, ZERO_SHOT_TASK, register_pipelines
from hf_align.model.card import TASK_NAMES, metric_display_name, ordered_metrics
from hf_align.model.processing import ImageSizeError, check_image_size
from hf_align.model.segmentation import overlay_segmentation
from hf_align.model.templates import check_template

logger = logging.getLogger(__name__)

MODEL_ENV = "HF_ALIGN_MODEL"
GALLERY_ENV = "HF_ALIGN_GALLERY"
# Where `hf-align quickstart` (default arguments, run from the same directory) saves its aligner.
QUICKSTART_ALIGNER = os.path.join(QuickstartArguments.output_dir, "aligner")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DIGIT_TEMPLATE = "a handwritten digit {}"  # how the quickstart captions its training digits
PHOTO_TEMPLATE = "a photo of {}."
DEFAULT_GALLERY_SIZE = 24
TOP_K = 5  # classes the classification chart shows
EXAMPLES = 8  # gallery images offered as one-click examples
IMAGE_HEIGHT = 256  # px
# Per request: each label is a text-tower forward, and every prompt is tokenised in full before truncation.
MAX_LABELS = 64
MAX_LABEL_CHARS = 100
MAX_TEMPLATE_CHARS = 200
MAX_QUERY_CHARS = 1000
# Small images (the 32 px digits) are drawn filling their frame, pixels kept sharp, rather than at their own size.
CSS = ".fill-frame img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


@dataclass
class Gallery:
    """The retrieval gallery (images, one caption each) and the classification defaults that suit it."""

    images: list[Image.Image]
    captions: list[str]
    labels: list[str]
    template: str


def load_gallery(folder: str | None = None, size: int = DEFAULT_GALLERY_SIZE) -> Gallery:
    """The images of `folder` (captions and labels from file names, template "a photo of {}."), else `size` digits
    (the ten digit names as labels, the quickstart's caption template)."""
    if folder:
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise ValueError(f"gallery folder {folder!r} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        images = [Image.open(os.path.join(folder, n)).convert("RGB") for n in names]
        captions = [os.path.splitext(n)[0].replace("_", " ").replace("-", " ") for n in names]
        return Gallery(images, captions, list(dict.fromkeys(captions)), PHOTO_TEMPLATE)
    from hf_align.testing import DIGIT_NAMES, digits_dataset

    digits = digits_dataset(size)
    return Gallery(list(digits["image"]), list(digits["caption"]), list(DIGIT_NAMES), DIGIT_TEMPLATE)


def required_model(model: str | None) -> str:
    """`model` (a Hub id or folder), checked to be given; the error says how to make one with the quickstart."""
    make_one = (
        f"train one with `hf-align quickstart` (EfficientNet-Lite0 + all-MiniLM-L6-v2 aligned on the digits, saved "
        f"to {QUICKSTART_ALIGNER}), then run `python app.py --model {QUICKSTART_ALIGNER}`"
    )
    if not model:
        raise ValueError(
            f"no aligner given: {make_one}; or name any trained aligner with --model <Hub id or folder> or the "
            f"{MODEL_ENV} environment variable"
        )
    if os.path.normpath(model) == QUICKSTART_ALIGNER and not os.path.isdir(model):
        raise ValueError(f"folder {model!r} does not exist here: {make_one}")
    return model


def parse_labels(text: str) -> list[str]:
    """The comma-separated labels, at most `MAX_LABELS` of at most `MAX_LABEL_CHARS` characters each."""
    text = text or ""
    # Refused before splitting: a huge request is not worth splitting to count its labels.
    if len(text) > MAX_LABELS * (MAX_LABEL_CHARS + 2):
        raise gr.Error(f"Too much text for {MAX_LABELS} labels of at most {MAX_LABEL_CHARS} characters.")
    labels = [label.strip() for label in text.split(",") if label.strip()]
    if not labels:
        raise gr.Error("Type at least one label (several are separated by commas).")
    if len(labels) > MAX_LABELS:
        raise gr.Error(f"Give at most {MAX_LABELS} labels, got {len(labels)}.")
    long = [label for label in labels if len(label) > MAX_LABEL_CHARS]
    if long:
        raise gr.Error(f"Labels can have at most {MAX_LABEL_CHARS} characters; {len(long)} label(s) are longer.")
    return labels


def parse_template(template: str) -> str:
    """The prompt template (empty: the bare label), at most `MAX_TEMPLATE_CHARS` with exactly one bare `{}`."""
    template = template or "{}"
    if len(template) > MAX_TEMPLATE_CHARS:
        raise gr.Error(f"The prompt template can have at most {MAX_TEMPLATE_CHARS} characters, got {len(template)}.")
    try:
        return check_template(template, "prompt template")
    except ValueError as err:
        raise gr.Error(str(err)) from err


def training_lines(summary) -> list[str]:
    """Markdown lines on what `summary` (a config's `training_summary`) records of the aligner's training run and
    evaluations: a run, or a bold warning that none is recorded; a malformed summary gets a notice instead."""
    try:
        return _training_lines(summary)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        # The summary comes from the aligner's config.json, which anyone can write: what it holds is shown, never
        # trusted to be well formed, and a bad one must not keep the demo from starting.
        logger.warning(
            "the aligner's training_summary is malformed (%s: %s); the header leaves it out", type(err).__name__, err
        )
        return [
            "**This aligner's config holds a malformed training summary**, so its training run and evaluations are "
            "not shown."
        ]


def _training_lines(summary) -> list[str]:
    lines = []
    if "global_step" in summary:
        pairs = f" on {summary['train_pairs']:,} image–text pairs" if summary.get("train_pairs") else ""
        lines.append(f"Trained with `{summary['trainer']}` for {summary['global_step']:,} steps{pairs}.")
    else:
        lines.append(
            "**No training run is recorded in this aligner's config**: unless it was trained some other way, its "
            "scores are those of an untrained aligner."
        )
    for run in summary.get("evaluations", []):
        dataset = run["dataset"].get("name") or run["dataset"].get("id") or "unnamed data"
        metrics = ", ".join(f"{metric_display_name(k)} {v:.4g}" for k, v in ordered_metrics(run["metrics"])[:3])
        lines.append(f"{TASK_NAMES[run['task']]} on {dataset}: {metrics}.")
    return lines


class AlignerDemo:
    """The demo's callbacks around one aligner; `build()` lays them out as a `gr.Blocks` app."""

    def __init__(self, model: str, gallery: Gallery):
        register_pipelines()
        self.model_name = model
        self.gallery = gallery
        self.classifier = pipeline(ZERO_SHOT_TASK, model=model)
        self.model = self.classifier.model
        shared = {
            "model": self.model,
            "tokenizer": self.classifier.tokenizer,
            "image_processor": self.classifier.image_processor,
        }
        self.image_search = pipeline(RETRIEVAL_TASK, **shared).set_gallery(images=gallery.images)
        self.caption_search = pipeline(RETRIEVAL_TASK, **shared).set_gallery(texts=gallery.captions)
        self.is_token_method = self.model.aligner.input_kind == "tokens"

    def _require_image(self, image) -> None:
        if image is None:
            raise gr.Error("Upload an image first.")
        try:
            check_image_size(self.classifier.image_processor, image)
        except ImageSizeError as err:
            raise gr.Error(f"This image cannot be used: {err}.") from err

    def classify(self, image: Image.Image, labels: str, template: str) -> dict[str, float]:
        """Softmax over all the labels of `logits_per_image` (what the transformers pipeline returns); the chart
        shows the `TOP_K` best."""
        self._require_image(image)
        results = self.classifier(
            image, candidate_labels=parse_labels(labels), hypothesis_template=parse_template(template)
        )
        return {r["label"]: r["score"] for r in results}

    def search_images(self, query: str, top_k: int) -> list[tuple[Image.Image, str]]:
        query = (query or "").strip()
        if not query:
            raise gr.Error("Type a text query.")
        if len(query) > MAX_QUERY_CHARS:
            raise gr.Error(f"A text query can have at most {MAX_QUERY_CHARS} characters, got {len(query)}.")
        return [(r["image"], f"{r['score']:.3f}") for r in self.image_search(query, top_k=int(top_k))]

    def search_captions(self, image: Image.Image, top_k: int) -> dict[str, float]:
        self._require_image(image)
        # Several gallery images may share a caption: keep each caption's best score.
        scores: dict[str, float] = {}
        for r in self.caption_search(image, top_k=int(top_k)):
            scores.setdefault(r["text"], r["score"])
        return scores

    def segment(self, image: Image.Image, labels: str, template: str, background: bool) -> tuple[Image.Image, dict]:
        """The label map drawn over the image, and the share of the image's pixels each class takes."""
        self._require_image(image)
        classes, template = parse_labels(labels), parse_template(template)
        try:
            label_map = self.model.segment(
                image, classes, templates=[template], background="background" if background else None
            )
        except ValueError as err:  # e.g. a method with no per-patch embedding
            raise gr.Error(str(err)) from err
        names = classes + (["background"] if background else [])
        counts = torch.bincount(label_map.flatten(), minlength=len(names)).double()
        return overlay_segmentation(image, label_map), dict(zip(names, (counts / counts.sum()).tolist()))

    def description(self) -> str:
        """Markdown: the aligner's encoders and method, and what its config records of its training and evaluations
        (a model with no training run recorded is flagged: its scores may be those of random projections)."""
        config = self.model.config
        lines = [
            f"Aligner `{self.model_name}`: vision encoder `{config.vision_encoder}`, text encoder "
            f"`{config.text_encoder}`, method `{config.method}`.",
            *training_lines(config.training_summary),
        ]
        return "\n\n".join(lines)

    def segmentation_notice(self) -> str:
        method = self.model.config.method
        if self.is_token_method:
            return f"Method `{method}` is a token method: every patch is scored against the labels."
        return (
            f"**Method `{method}` is not a token method**: it was trained on pooled features, so each patch is "
            "embedded as if it were a whole image (a MaskCLIP-style baseline) and the maps are coarse. Token methods "
            "such as `token_relative` are trained for segmentation."
        )

    def build(self) -> gr.Blocks:
        gallery = self.gallery
        top_k_max = min(10, len(self.image_search.gallery_items))
        default_labels = ", ".join(gallery.labels)
        examples = [[image] for image in gallery.images[:EXAMPLES]]
        with gr.Blocks(title="hf_align demo", analytics_enabled=False) as demo:
            gr.Markdown("# hf_align aligner demo\n" + self.description())
            with gr.Tab("Zero-shot classification"):
                with gr.Row():
                    with gr.Column():
                        image = gr.Image(
                            value=gallery.images[0],
                            type="pil",
                            label="Image",
                            height=IMAGE_HEIGHT,
                            elem_classes="fill-frame",
                        )
                        gr.Examples(examples, inputs=[image], label="Gallery images")
                        labels = gr.Textbox(label="Labels, comma separated", value=default_labels)
                        template = gr.Textbox(label="Prompt template", value=gallery.template)
                        run = gr.Button("Classify", variant="primary")
                    scores = gr.Label(num_top_classes=TOP_K, label=f"Top-{TOP_K} labels (softmax over all labels)")
                run.click(self.classify, [image, labels, template], scores, api_name="classify")
                # The page opens with the example image already classified.
                demo.load(self.classify, [image, labels, template], scores, api_visibility="private")
            with gr.Tab("Retrieval"):
                gr.Markdown(f"A gallery of {len(self.image_search.gallery_items)} images, each with a caption.")
                top_k = gr.Slider(1, top_k_max, value=min(5, top_k_max), step=1, label="Top k")
                with gr.Row():
                    with gr.Column():
                        query = gr.Textbox(label="Text query", value=gallery.captions[0])
                        search = gr.Button("Find images", variant="primary")
                        found = gr.Gallery(label="Best images (score)", columns=5, format="png")
                    with gr.Column():
                        query_image = gr.Image(
                            type="pil", label="Image query", height=IMAGE_HEIGHT, elem_classes="fill-frame"
                        )
                        describe = gr.Button("Find captions", variant="primary")
                        captions = gr.Label(label="Best captions (score)")
                search.click(self.search_images, [query, top_k], found, api_name="search_images")
                describe.click(self.search_captions, [query_image, top_k], captions, api_name="search_captions")
            with gr.Tab("Segmentation"):
                gr.Markdown(self.segmentation_notice())
                with gr.Row():
                    with gr.Column():
                        seg_image = gr.Image(
                            value=gallery.images[0],
                            type="pil",
                            label="Image",
                            height=IMAGE_HEIGHT,
                            elem_classes="fill-frame",
                        )
                        seg_labels = gr.Textbox(label="Classes, comma separated", value=default_labels)
                        seg_template = gr.Textbox(label="Prompt template", value=gallery.template)
                        background = gr.Checkbox(label="Add a 'background' class", value=False)
                        segment = gr.Button("Segment", variant="primary")
                    with gr.Column():
                        overlay = gr.Image(
                            type="pil", label="Label map", format="png", height=IMAGE_HEIGHT, elem_classes="fill-frame"
                        )
                        areas = gr.Label(label="Share of the image")
                segment.click(
                    self.segment,
                    [seg_image, seg_labels, seg_template, background],
                    [overlay, areas],
                    api_name="segment",
                )
        return demo


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=os.environ.get(MODEL_ENV), help=f"trained aligner: Hub id or folder (env {MODEL_ENV})"
    )
    parser.add_argument(
        "--gallery", default=os.environ.get(GALLERY_ENV), help=f"folder of gallery images (env {GALLERY_ENV})"
    )
    parser.add_argument("--host", default="0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    args = parser.parse_args(argv)
    try:
        model = required_model(args.model)
    except ValueError as err:
        parser.error(str(err))
    AlignerDemo(model, load_gallery(args.gallery)).build().launch(server_name=args.host, server_port=args.port, css=CSS)


if __name__ == "__main__":
    main()
