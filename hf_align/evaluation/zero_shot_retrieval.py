"""Zero-shot classification and cross-modal retrieval (protocols: docs/methods.md §9).

The metric functions work on score matrices; the `evaluate_*` functions embed a dataset first, from raw images and
captions (encoders run) or from a feature cache (no encoder runs for what the cache holds).

An `evaluate_*` function returns its metrics and writes nothing into the model. The result (an `EvaluationResult`:
the metrics dict, plus the task, data and protocol of the run) is what the caller records on the model card:

```python
results = hf_align.evaluate_zero_shot(model, processor, test_set, dataset_name="cifar10", dataset_split="test")
model.model_card_data.add_evaluation(results)  # or hf_align.record_evaluation(model, results)
model.save_pretrained("out")  # the card's model-index lists the run
```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import datasets
import torch

from ..features import FeatureCollator, column_array, features_for
from ..functional.retrieval import check_ks, check_text_image_index, chunked_retrieval_metrics, recall_metrics
from ..model.configuration import TASK_RETRIEVAL, TASK_ZERO_SHOT
from ..model.processing import check_image_size
from ..model.templates import DEFAULT_TEMPLATES, class_prototypes, embed_texts
from ..training.batches import check_finite_rows, table_rows
from ..utils.cpu_threads import scoped_cpu_threads

if TYPE_CHECKING:  # annotations only
    from ..model.modeling import AlignerModel


class EvaluationResult(dict):
    """What an `evaluate_*` function returns: its metrics (this dict, as before), and what a model card needs to
    record the run.

    Record it with `model.model_card_data.add_evaluation(result)` or `hf_align.record_evaluation(model, result)`.

    Attributes:
        task (`str`): the task evaluated, `hf_align.model.configuration.TASK_ZERO_SHOT`, `TASK_RETRIEVAL` or
            `TASK_SEGMENTATION`.
        card_metrics (`dict[str, float]`): the metrics the card lists (default: all of them; segmentation leaves out
            its per-class IoU and image count).
        dataset: the evaluated data (a Hub-loaded `datasets.Dataset` names its own id, split and revision).
        dataset_name, dataset_split (`str`, *optional*): how the card names the data, over what `dataset` says.
        num_samples (`int`, *optional*): samples evaluated. details (`str`, *optional*): one line of protocol.
    """

    def __init__(
        self,
        metrics: Mapping[str, Any],
        *,
        task: str,
        card_metrics: Mapping[str, float] | None = None,
        dataset=None,
        dataset_name: str | None = None,
        dataset_split: str | None = None,
        num_samples: int | None = None,
        details: str | None = None,
    ):
        super().__init__(metrics)
        self.task = task
        self.card_metrics = dict(metrics if card_metrics is None else card_metrics)
        self.dataset = dataset
        self.dataset_name = dataset_name
        self.dataset_split = dataset_split
        self.num_samples = num_samples
        self.details = details


# ---------------------------------------------------------------------------------------------- metrics
def retrieval_metrics(
    logits_per_image: torch.Tensor, text_image_index: torch.Tensor | Sequence[int], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k in both directions, in percent, for any number of captions per image.

    Args:
        logits_per_image: (n_images, n_texts) scores.
        text_image_index: (n_texts,) index of the image each text describes.

    A text→image query hits at k if its image ranks in the top k; an image→text query hits if *any* of its captions
    does. Rank = number of negatives scoring at least as high as the best positive: ties count *against* the query,
    so a collapsed model that scores everything alike gets chance-level recall, not 100%. Returns
    `image_to_text_R@k`, `text_to_image_R@k` and their mean `mean_R@k` for each k.
    """
    scores = torch.as_tensor(logits_per_image).float()
    if scores.dim() != 2:
        raise ValueError(f"logits_per_image must be a (n_images, n_texts) matrix, got shape {tuple(scores.shape)}")
    _check_scores("logits_per_image", scores, ks)
    n_images, n_texts = scores.shape
    if n_texts == 0 or n_images == 0:
        raise ValueError(f"retrieval needs at least one image and one text, got scores of shape {tuple(scores.shape)}")
    owner = check_text_image_index(text_image_index, n_images, n_texts, scores.device)
    texts = torch.arange(n_texts, device=scores.device)
    # text -> image: rank of the text's own image in its column
    positive = scores[owner, texts]
    text_rank = (scores >= positive[None, :]).sum(0) - 1  # the text's own image ties with itself
    # image -> text: rank of the image's best-scoring caption among the other images' captions
    best_positive = torch.full((n_images,), float("-inf"), device=scores.device)
    best_positive = best_positive.scatter_reduce(0, owner, positive, reduce="amax")
    has_caption = torch.isfinite(best_positive)
    tied_positives = torch.zeros(n_images, device=scores.device).scatter_add(
        0, owner, (positive >= best_positive[owner]).float()
    )
    image_rank = ((scores >= best_positive[:, None]).sum(1) - tied_positives.long())[has_caption]
    return recall_metrics(image_rank, text_rank, ks)


def zero_shot_metrics(
    logits: torch.Tensor, labels: torch.Tensor | Sequence[int], ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy and mean per-class recall (percent) of (n, C) class scores against (n,) integer labels."""
    logits = torch.as_tensor(logits).float()
    labels = torch.as_tensor(labels, dtype=torch.long, device=logits.device)
    if logits.dim() != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"need (n, C) logits and (n,) labels, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(
            f"zero-shot metrics need at least one sample and one class, got logits of shape {tuple(logits.shape)}"
        )
    _check_scores("logits", logits, ks)
    n_classes = logits.shape[1]
    if labels.numel() and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(
            f"labels must lie in [0, {n_classes}) for {n_classes} classes, got [{labels.min()}, {labels.max()}]"
        )
    metrics = {}
    # One stable ranking for top-k and the per-class recall: tied classes rank by index, as argmax does (topk's
    # tie order is unspecified, so top1 could disagree with the argmax prediction on tied scores).
    ranking = logits.argsort(dim=1, descending=True, stable=True)
    for k in ks:
        top = ranking[:, : min(k, n_classes)]
        metrics[f"top{k}"] = 100.0 * (top == labels[:, None]).any(1).float().mean().item()
    predicted = ranking[:, 0]
    recalls = [(predicted[labels == c] == c).float().mean() for c in range(n_classes) if (labels == c).any()]
    metrics["mean_per_class_recall"] = 100.0 * torch.stack(recalls).mean().item()
    return metrics


def _check_scores(name: str, scores: torch.Tensor, ks: Sequence[int]) -> None:
    # A NaN compares False with everything, so it would rank first and report a perfect recall: refuse it.
    nan = torch.isnan(scores)
    if bool(nan.any()):
        rows = torch.nonzero(nan.any(1)).flatten().tolist()
        raise ValueError(f"{name} holds NaN scores in {len(rows)} row(s), e.g. rows {rows[:10]}")
    check_ks(ks)


# ---------------------------------------------------------------------------------------------- embedding helpers
def is_feature_cache(dataset: datasets.Dataset) -> bool:
    return any(c.startswith(("vision_layer_", "vision_tokens_layer_")) for c in dataset.column_names)


@torch.no_grad()
def embed_images(model: AlignerModel, processor, images, batch_size: int = 64, first: int = 0) -> torch.Tensor:
    """Aligned embeddings (n, D) of images through the frozen vision encoder.

    Each image is checked first (`hf_align.model.processing.check_image_size`); an `ImageSizeError` names it as
    `image <first + position>` (`first`: the position of `images[0]` in the caller's data).
    """
    for i, image in enumerate(images):
        check_image_size(processor.image_processor, image, f"image {first + i}")
    out = []
    for start in range(0, len(images), batch_size):
        pixel_values = processor.image_processor(images=images[start : start + batch_size], return_tensors="pt")
        out.append(model.get_image_features(pixel_values=pixel_values["pixel_values"].to(model.device)))
    return torch.cat(out)


@torch.no_grad()
def embed_feature_cache(
    model: AlignerModel, features: datasets.Dataset, batch_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned image and text embeddings of every row of a feature cache: two (n, D) tensors.

    A row with NaN/Inf features is refused (`ValueError`) by its row of `features` and, when `features` is a selection
    of a cache (`features.select(test_rows)`, a split), by its row in that cache
    (`hf_align.training.batches.table_rows`), not by its position in a batch.
    """
    view = features_for(model, features)
    table = table_rows(features)
    collate = FeatureCollator()
    images, texts = [], []
    for start in range(0, len(view), batch_size):
        batch = collate(view[start : start + batch_size])
        rows = torch.arange(start, start + len(batch["vision_features"]))
        # NaN/Inf checked here, by cache row: the model's own check would name a position in the batch.
        check_finite_rows({name: batch[name] for name in ("vision_features", "text_features")}, rows, table)
        images.append(
            model.get_image_features(vision_features=batch["vision_features"], vision_mask=batch.get("vision_mask"))
        )
        texts.append(model.get_text_features(text_features=batch["text_features"], text_mask=batch.get("text_mask")))
    return torch.cat(images), torch.cat(texts)


# ---------------------------------------------------------------------------------------------- protocols
@scoped_cpu_threads
@torch.no_grad()
def evaluate_zero_shot(
    model: AlignerModel,
    processor,
    dataset: datasets.Dataset,
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    image_column: str = "image",
    label_column: str = "label",
    batch_size: int = 64,
    dataset_name: str | None = None,
    dataset_split: str | None = None,
) -> EvaluationResult:
    """Zero-shot classification: top-1, top-5 and mean per-class recall (percent), each image ranked against the
    class prototypes by the model's similarity head (`model.similarity.score_unit_norm`, as in its logits).

    `dataset` holds images (raw, or a feature cache with the image features) and integer labels. Class names default
    to the label column's `ClassLabel` names; `templates` default to CLIP's 80 ImageNet prompts (each must hold exactly
    one bare `{}`: `hf_align.model.templates.check_template`). An image the image processor would blow up raises
    `hf_align.model.processing.ImageSizeError` naming its row.

    Returns an `EvaluationResult`, the dict `top1`, `top5`, `mean_per_class_recall`; nothing is written into the
    model. To list the run on the model card (under `dataset_name` / `dataset_split`, default: what a Hub-loaded
    `dataset` knows about itself), record it: `model.model_card_data.add_evaluation(result)` (or
    `hf_align.record_evaluation(model, result)`).
    """
    model.eval()
    if label_column not in dataset.column_names:
        raise ValueError(f"label_column={label_column!r} is not a column of the dataset: {dataset.column_names}")
    if class_names is None:
        feature = dataset.features[label_column]
        if not isinstance(feature, datasets.ClassLabel):
            raise ValueError(f"class_names not given and column {label_column!r} is not a ClassLabel with names")
        class_names = feature.names
    prototypes = class_prototypes(model, processor, class_names, templates)
    if is_feature_cache(dataset):
        first = first_row_per_image(dataset)
        subset = dataset.select(first)
        images, _ = embed_feature_cache(model, subset)
        labels = subset[label_column]
    else:
        if image_column not in dataset.column_names:
            raise ValueError(f"image_column={image_column!r} is not a column of the dataset: {dataset.column_names}")
        images = torch.cat(
            [
                embed_images(model, processor, dataset[s : s + batch_size][image_column], first=s)
                for s in range(0, len(dataset), batch_size)
            ]
        )
        labels = dataset[label_column]
    # Ranked by the model's own head, the function its forward makes logits with (a positive temperature cannot
    # change a ranking): a learned or distance head is evaluated as it scores, not as a raw dot product.
    logits = model.similarity.score_unit_norm(images, prototypes.to(images))
    metrics = zero_shot_metrics(logits, labels)
    n_templates = len(templates or DEFAULT_TEMPLATES)
    return EvaluationResult(
        metrics,
        task=TASK_ZERO_SHOT,
        dataset=dataset,
        dataset_name=dataset_name,
        dataset_split=dataset_split,
        num_samples=len(labels),
        details=f"{len(labels)} images, {len(class_names)} classes, {n_templates} prompt template"
        f"{'s' if n_templates > 1 else ''} per class",
    )


@scoped_cpu_threads
@torch.no_grad()
def evaluate_retrieval(
    model: AlignerModel,
    processor=None,
    dataset: datasets.Dataset | None = None,
    image_column: str = "image",
    text_column: str = "caption",
    batch_size: int = 64,
    dataset_name: str | None = None,
    dataset_split: str | None = None,
) -> EvaluationResult:
    """Image↔text retrieval R@1/5/10 both ways (percent), several captions per image allowed, every pair scored by
    the model's similarity head (`model.similarity.score_unit_norm`, as in its logits).

    `dataset` is a feature cache (rows sharing an `image_id` are captions of one image; `processor` unused) or raw
    data with an image column and a caption column holding a string or a list of strings per image.

    Returns an `EvaluationResult`, the dict `image_to_text_R@k`, `text_to_image_R@k`, `mean_R@k`; nothing is written
    into the model. To list the run on the model card (under `dataset_name` / `dataset_split`, default: what a
    Hub-loaded `dataset` knows about itself), record it: `model.model_card_data.add_evaluation(result)` (or
    `hf_align.record_evaluation(model, result)`).
    """
    model.eval()
    if dataset is None or len(dataset) == 0:
        raise ValueError("evaluate_retrieval needs a non-empty dataset")
    if is_feature_cache(dataset):
        first = first_row_per_image(dataset)
        image_embeds, text_embeds = embed_feature_cache(model, dataset)
        image_ids = torch.as_tensor(column_array(dataset, "image_id"))
        slot = {int(image_ids[row]): i for i, row in enumerate(first)}
        owner = torch.tensor([slot[int(i)] for i in image_ids])
        image_embeds = image_embeds[torch.as_tensor(first)]
    else:
        for argument, column in (("image_column", image_column), ("text_column", text_column)):
            if column not in dataset.column_names:
                raise ValueError(f"{argument}={column!r} is not a column of the dataset: {dataset.column_names}")
        captions, owner = [], []
        for i, caption in enumerate(dataset[text_column]):
            group = caption if isinstance(caption, list) else [caption]
            captions.extend(group)
            owner.extend([i] * len(group))
        image_embeds = torch.cat(
            [
                embed_images(model, processor, dataset[s : s + batch_size][image_column], first=s)
                for s in range(0, len(dataset), batch_size)
            ]
        )
        text_embeds = embed_texts(model, processor, captions)
        owner = torch.tensor(owner)
    # In blocks: the full (n_images, n_texts) score matrix of a large test set would not fit in memory. Each block
    # is scored by the head's `score_unit_norm`, what the model's forward makes its logits with.
    metrics = chunked_retrieval_metrics(
        image_embeds, text_embeds, owner.to(image_embeds.device), similarity=model.similarity.score_unit_norm
    )
    return EvaluationResult(
        metrics,
        task=TASK_RETRIEVAL,
        dataset=dataset,
        dataset_name=dataset_name,
        dataset_split=dataset_split,
        num_samples=len(image_embeds),
        details=f"{len(text_embeds)} captions of {len(image_embeds)} images, every image against every caption",
    )


def first_row_per_image(dataset: datasets.Dataset) -> list[int]:
    if "image_id" not in dataset.column_names:
        return list(range(len(dataset)))
    seen, first = set(), []
    for row, image_id in enumerate(column_array(dataset, "image_id").tolist()):
        if image_id not in seen:
            seen.add(image_id)
            first.append(row)
    return first


__all__ = [
    "EvaluationResult",
    "class_prototypes",
    "embed_feature_cache",
    "embed_images",
    "embed_texts",
    "evaluate_retrieval",
    "evaluate_zero_shot",
    "is_feature_cache",
    "retrieval_metrics",
    "zero_shot_metrics",
]
