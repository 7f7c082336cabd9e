"""Gradio demo (and Hugging Face Space) for any hf_align aligner.

Tabs: zero-shot classification (an image + your labels -> scores), retrieval over a small gallery (text -> images,
image -> captions) and zero-shot segmentation (`AlignerModel.segment`, made for token methods such as
`token_relative`).

    python app.py --model user/aligner            # or a local folder; or set HF_ALIGN_MODEL
    python app.py --model ./out --gallery ./my_images --port 7860

The gallery defaults to 24 images of scikit-learn's bundled handwritten digits (captioned "a handwritten digit
three", ...), so the demo runs offline; `--gallery DIR` uses the images of a folder instead, captioned by their file
names ("red_car.jpg" -> "red car").
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import gradio as gr
import torch
from PIL import Image
from transformers import pipeline

from hf_align.pipelines import RETRIEVAL_TASK, ZERO_SHOT_TASK, register_pipelines
from hf_align.segmentation_inference import overlay_segmentation

MODEL_ENV = "HF_ALIGN_MODEL"
GALLERY_ENV = "HF_ALIGN_GALLERY"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_TEMPLATE = "a photo of {}."
DEFAULT_GALLERY_SIZE = 24


def load_gallery(folder: str | None = None, size: int = DEFAULT_GALLERY_SIZE) -> tuple[list[Image.Image], list[str]]:
    """Gallery images and one caption each: the images of `folder` (captions from file names), else digits."""
    if folder:
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise ValueError(f"gallery folder {folder!r} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        images = [Image.open(os.path.join(folder, n)).convert("RGB") for n in names]
        return images, [os.path.splitext(n)[0].replace("_", " ").replace("-", " ") for n in names]
    from hf_align.testing import digits_dataset

    digits = digits_dataset(size)
    return list(digits["image"]), list(digits["caption"])


def parse_labels(text: str) -> list[str]:
    labels = [label.strip() for label in (text or "").split(",") if label.strip()]
    if not labels:
        raise gr.Error("Type at least one label (several are separated by commas).")
    return labels


def _require_image(image) -> None:
    if image is None:
        raise gr.Error("Upload an image first.")


class AlignerDemo:
    """The demo's callbacks around one aligner; `build()` lays them out as a `gr.Blocks` app."""

    def __init__(self, model: str, gallery_images: Sequence[Image.Image], gallery_captions: Sequence[str]):
        register_pipelines()
        self.model_name = model
        self.classifier = pipeline(ZERO_SHOT_TASK, model=model)
        self.model = self.classifier.model
        shared = {
            "model": self.model,
            "tokenizer": self.classifier.tokenizer,
            "image_processor": self.classifier.image_processor,
        }
        self.image_search = pipeline(RETRIEVAL_TASK, **shared).set_gallery(images=gallery_images)
        self.caption_search = pipeline(RETRIEVAL_TASK, **shared).set_gallery(texts=gallery_captions)
        self.is_token_method = self.model.aligner.input_kind == "tokens"

    def classify(self, image: Image.Image, labels: str, template: str) -> dict[str, float]:
        """Softmax over the labels of `logits_per_image` (what the transformers pipeline returns)."""
        _require_image(image)
        results = self.classifier(image, candidate_labels=parse_labels(labels), hypothesis_template=template or "{}")
        return {r["label"]: r["score"] for r in results}

    def search_images(self, query: str, top_k: int) -> list[tuple[Image.Image, str]]:
        if not (query or "").strip():
            raise gr.Error("Type a text query.")
        return [(r["image"], f"{r['score']:.3f}") for r in self.image_search(query.strip(), top_k=int(top_k))]

    def search_captions(self, image: Image.Image, top_k: int) -> dict[str, float]:
        _require_image(image)
        # Several gallery images may share a caption: keep each caption's best score.
        scores: dict[str, float] = {}
        for r in self.caption_search(image, top_k=int(top_k)):
            scores.setdefault(r["text"], r["score"])
        return scores

    def segment(self, image: Image.Image, labels: str, template: str, background: bool) -> tuple[Image.Image, dict]:
        """The label map drawn over the image, and the share of the image's pixels each class takes."""
        _require_image(image)
        classes = parse_labels(labels)
        try:
            label_map = self.model.segment(
                image, classes, templates=[template or "{}"], background="background" if background else None
            )
        except ValueError as err:  # e.g. a method with no per-patch embedding
            raise gr.Error(str(err)) from err
        names = classes + (["background"] if background else [])
        counts = torch.bincount(label_map.flatten(), minlength=len(names)).double()
        return overlay_segmentation(image, label_map), dict(zip(names, (counts / counts.sum()).tolist()))

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
        top_k_max = min(10, len(self.image_search.gallery_items))
        with gr.Blocks(title="hf_align demo", analytics_enabled=False) as demo:
            gr.Markdown(
                f"# hf_align aligner demo\nModel: `{self.model_name}` (method `{self.model.config.method}`; vision "
                f"`{self.model.config.vision_encoder}`, text `{self.model.config.text_encoder}`)"
            )
            with gr.Tab("Zero-shot classification"):
                with gr.Row():
                    with gr.Column():
                        image = gr.Image(type="pil", label="Image")
                        labels = gr.Textbox(label="Labels, comma separated", value="cat, dog, car")
                        template = gr.Textbox(label="Prompt template", value=DEFAULT_TEMPLATE)
                        run = gr.Button("Classify", variant="primary")
                    scores = gr.Label(label="Scores")
                run.click(self.classify, [image, labels, template], scores, api_name="classify")
            with gr.Tab("Retrieval"):
                gr.Markdown(f"A gallery of {len(self.image_search.gallery_items)} images, each with a caption.")
                top_k = gr.Slider(1, top_k_max, value=min(5, top_k_max), step=1, label="Top k")
                with gr.Row():
                    with gr.Column():
                        query = gr.Textbox(label="Text query", value="a handwritten digit three")
                        search = gr.Button("Find images", variant="primary")
                        found = gr.Gallery(label="Best images (score)", columns=5, format="png")
                    with gr.Column():
                        query_image = gr.Image(type="pil", label="Image query")
                        describe = gr.Button("Find captions", variant="primary")
                        captions = gr.Label(label="Best captions (score)")
                search.click(self.search_images, [query, top_k], found, api_name="search_images")
                describe.click(self.search_captions, [query_image, top_k], captions, api_name="search_captions")
            with gr.Tab("Segmentation"):
                gr.Markdown(self.segmentation_notice())
                with gr.Row():
                    with gr.Column():
                        seg_image = gr.Image(type="pil", label="Image")
                        seg_labels = gr.Textbox(label="Classes, comma separated", value="cat, grass, sky")
                        seg_template = gr.Textbox(label="Prompt template", value=DEFAULT_TEMPLATE)
                        background = gr.Checkbox(label="Add a 'background' class", value=False)
                        segment = gr.Button("Segment", variant="primary")
                    with gr.Column():
                        overlay = gr.Image(type="pil", label="Label map", format="png")
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
        "--model", default=os.environ.get(MODEL_ENV), help=f"aligner Hub id or folder (env {MODEL_ENV})"
    )
    parser.add_argument(
        "--gallery", default=os.environ.get(GALLERY_ENV), help=f"folder of gallery images (env {GALLERY_ENV})"
    )
    parser.add_argument("--host", default="0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    args = parser.parse_args(argv)
    if not args.model:
        parser.error(f"give the aligner with --model <Hub id or folder> or the {MODEL_ENV} environment variable")
    images, captions = load_gallery(args.gallery)
    AlignerDemo(args.model, images, captions).build().launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
