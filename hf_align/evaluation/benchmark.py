"""Zero-shot classification and retrieval suites on an aligner, the way clip_benchmark runs them on CLIP models.

A suite is a list of `BenchmarkDataset`s, each read from one of:

* an image-folder: one subfolder of images per class (sorted names = label order) -> zero-shot classification;
* a caption folder: images plus `metadata.jsonl` or `metadata.csv` (the `datasets` ImageFolder convention: a
  `file_name` column and a `caption` / `captions` / `text` column; several rows, or a list, per image) -> retrieval;
* a `save_to_disk` folder or a Hub dataset id (`datasets.load_dataset`), zero-shot when it has a label column
  (`label`, `cls` or a `ClassLabel`), retrieval when it has a caption column (`caption`, `captions`, `txt`, `text`,
  `sentences`; a caption cell holds one caption, a list, or several one per line, as clip_benchmark's webdatasets do).

A standard name alone (`cifar10`, `imagenet1k`, `flickr30k`, `vtab/pets`, ...) stands for clip_benchmark's Hub copy of
that dataset, `clip-benchmark/wds_<name with / as ->`. Class names and prompt templates come, first found first:
from the folder's (or Hub repo's) `classnames.txt` / `zeroshot_classification_templates.txt` (clip_benchmark's
webdataset files, one per line); for a standard name, from the lists clip_benchmark ships (when it is installed);
then from the data (`ClassLabel` or folder names) and `hf_align.model.templates.DEFAULT_TEMPLATES` (CLIP's 80 prompts).

`run_benchmark` scores each dataset with `evaluate_zero_shot` / `evaluate_retrieval` (both rank with the model's own
similarity head, as its logits do), records every result on the
model's card data (the card's model-index lists them once the aligner is saved), and writes `benchmark.csv`,
`benchmark.json` and `benchmark.png` (a bar chart of the headline metrics) to its output folder.
"""

from __future__ import annotations

import csv
import functools
import importlib.resources
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import datasets

from ..features.decode import load_dataset_split
from ..model.configuration import TASK_RETRIEVAL, TASK_ZERO_SHOT
from ..model.templates import DEFAULT_TEMPLATES
from .zero_shot_retrieval import EvaluationResult, evaluate_retrieval, evaluate_zero_shot

if TYPE_CHECKING:  # annotations only
    from ..model.modeling import AlignerModel

CLIP_BENCHMARK_HUB_PREFIX = "clip-benchmark/wds_"
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
LABEL_COLUMNS = ("label", "cls")
CAPTION_COLUMNS = ("caption", "captions", "txt", "text", "sentences")
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
# The headline numbers of the summary plot, per task.
PLOTTED_METRICS = {
    TASK_ZERO_SHOT: ("top1", "top5"),
    TASK_RETRIEVAL: ("image_to_text_R@1", "text_to_image_R@1", "image_to_text_R@5", "text_to_image_R@5"),
}


@dataclass(frozen=True)
class BenchmarkDataset:
    """One dataset of a suite.

    Args:
        name (`str`): how the results, the table and the model card name it; a clip_benchmark standard name
            (`cifar10`, ...) also selects that dataset's class names and templates.
        source (`str`): an image-folder or caption folder, a `save_to_disk` folder, or a Hub dataset id.
        split (`str`): the split of a Hub or `save_to_disk` dataset (folders are one split, recorded as this).
        config (`str`, *optional*): the Hub dataset's configuration.
    """

    name: str
    source: str
    split: str = "test"
    config: str | None = None

    @classmethod
    def parse(cls, spec: str, split: str = "test", config: str | None = None) -> BenchmarkDataset:
        """`"name=source"`, a folder (named by its base name), or a standard name (its clip_benchmark Hub copy)."""
        name, sep, source = spec.partition("=")
        name, source = name.strip(), source.strip()
        if not name or (sep and not source):
            raise ValueError(f"a dataset is 'name=source', a folder or a standard name; got {spec!r}")
        if not sep:
            source = name
            if os.path.isdir(source):
                name = os.path.basename(os.path.normpath(source))
            else:
                source = CLIP_BENCHMARK_HUB_PREFIX + name.replace("/", "-")
        return cls(name, source, split, config)


@dataclass
class BenchmarkRun:
    """What `run_benchmark` did: one `EvaluationResult` per dataset (in suite order; each carries its `task`,
    `dataset_name` and `dataset_split`) and the files it wrote."""

    results: list[EvaluationResult]
    files: dict[str, str] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """One flat row per dataset: `dataset`, `task`, `split`, `num_samples`, then its metrics."""
        return [
            {"dataset": r.dataset_name, "task": r.task, "split": r.dataset_split, "num_samples": r.num_samples, **r}
            for r in self.results
        ]


# ---------------------------------------------------------------------------------------------- class names, prompts
@functools.cache
def clip_benchmark_table(filename: str) -> dict | None:
    """A JSON table clip_benchmark ships in `clip_benchmark/datasets/` (`en_classnames.json`,
    `en_zeroshot_classification_templates.json`), or `None` when clip_benchmark is not installed."""
    try:
        root = importlib.resources.files("clip_benchmark")
    except ModuleNotFoundError:
        return None
    with (root / "datasets" / filename).open(encoding="utf-8") as handle:
        return json.load(handle)


def standard_class_names(name: str) -> list[str] | None:
    """clip_benchmark's class names for a standard dataset name (by label), or `None` (unknown name, or
    clip_benchmark not installed). Datasets whose torchvision loader names its classes (cifar10, ...) have none."""
    table = clip_benchmark_table("en_classnames.json")
    return None if table is None or name not in table else list(table[name])


def standard_templates(name: str) -> list[str] | None:
    """clip_benchmark's prompt templates for a standard dataset name, with `{}` for the class name (clip_benchmark
    writes `{c}`), or `None` (unknown name, or clip_benchmark not installed)."""
    table = clip_benchmark_table("en_zeroshot_classification_templates.json")
    if table is None or not isinstance(table.get(name), list):
        return None
    return [template.replace("{c}", "{}") for template in table[name]]


def _listed_file(entry: BenchmarkDataset, filename: str) -> list[str] | None:
    """The non-empty lines of a clip_benchmark webdataset text file beside the data: in a local folder, or at the
    root of a Hub dataset repo (`None` when there is none)."""
    if os.path.isdir(entry.source):
        path = os.path.join(entry.source, filename)
        if not os.path.isfile(path):
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

        try:
            path = hf_hub_download(entry.source, filename, repo_type="dataset")
        except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError):
            return None
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def class_names_and_templates(
    entry: BenchmarkDataset, dataset: datasets.Dataset, label_column: str
) -> tuple[list[str], list[str], str]:
    """Class names (by label) and templates (`{}` placeholders) for a zero-shot dataset, and where they came from.

    Raises `ValueError` when no class names are found, or when their number is not the data's number of classes.
    """
    names, origin = _listed_file(entry, CLASSNAMES_FILE), CLASSNAMES_FILE
    if names is None:
        names, origin = standard_class_names(entry.name), "clip_benchmark"
    feature = dataset.features[label_column]
    if names is None and isinstance(feature, datasets.ClassLabel):
        names, origin = list(feature.names), "the dataset"
    if names is None:
        raise ValueError(
            f"no class names for dataset {entry.name!r}: its column {label_column!r} is not a ClassLabel, it is not a "
            f"clip_benchmark standard name with class names, and it has no {CLASSNAMES_FILE}"
        )
    if isinstance(feature, datasets.ClassLabel) and feature.num_classes != len(names):
        raise ValueError(
            f"dataset {entry.name!r} has {feature.num_classes} classes but {origin} names {len(names)}: "
            f"{names[:5]}{' ...' if len(names) > 5 else ''}"
        )
    templates = _listed_file(entry, TEMPLATES_FILE)
    templates = [t.replace("{c}", "{}") for t in templates] if templates is not None else None
    templates = templates or standard_templates(entry.name) or list(DEFAULT_TEMPLATES)
    return names, templates, origin


# ---------------------------------------------------------------------------------------------- folders
def load_image_folder(folder: str) -> datasets.Dataset:
    """An image-folder as a `datasets.Dataset`: `image` (decoded lazily) and `label`, a `ClassLabel` named after the
    sorted class subfolders. Raises `ValueError` for a folder without class subfolders or a class without images."""
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise ValueError(f"{folder!r} has no class subfolders (an image-folder holds one folder of images per class)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(folder, name)) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            kinds = ", ".join(IMAGE_EXTENSIONS)
            raise ValueError(f"class folder {os.path.join(folder, name)!r} holds no images ({kinds})")
        paths += [os.path.join(folder, name, f) for f in files]
        labels += [label] * len(files)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    return datasets.Dataset.from_dict({"image": paths, "label": labels}, features=features)


def load_caption_folder(folder: str) -> datasets.Dataset:
    """A caption folder as a `datasets.Dataset` with one row per image: `image` (decoded lazily) and `caption`, the
    list of that image's captions in file order. Reads `metadata.jsonl` (else `metadata.csv`): `file_name` relative to
    the folder, and a caption column (`caption`, `captions` or `text`) holding a str or, in JSON, a list of str."""
    path = next((os.path.join(folder, f) for f in METADATA_FILES if os.path.isfile(os.path.join(folder, f))), None)
    if path is None:
        raise ValueError(f"{folder!r} has no {' or '.join(METADATA_FILES)} listing its images' captions")
    with open(path, encoding="utf-8", newline="") as handle:
        if path.endswith(".jsonl"):
            records = [json.loads(line) for line in handle if line.strip()]
        else:
            records = list(csv.DictReader(handle))
    captions: dict[str, list[str]] = {}
    for number, record in enumerate(records, start=1):
        column = next((c for c in ("caption", "captions", "text") if c in record), None)
        if "file_name" not in record or column is None:
            raise ValueError(
                f"{path} record {number} needs `file_name` and a caption column (caption, captions or text); "
                f"it has {sorted(record)}"
            )
        value = record[column]
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise ValueError(f"{path} record {number}: {column} must be a non-empty str or list of str, got {value!r}")
        image = os.path.join(folder, record["file_name"])
        if not os.path.isfile(image):
            raise ValueError(f"{path} record {number} names {record['file_name']!r}, which is not a file in {folder!r}")
        captions.setdefault(image, []).extend(texts)
    if not captions:
        raise ValueError(f"{path} lists no images")
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string"))})
    return datasets.Dataset.from_dict({"image": list(captions), "caption": list(captions.values())}, features=features)


def load_benchmark_dataset(entry: BenchmarkDataset) -> datasets.Dataset:
    """The data of one entry: a caption folder, an image-folder, a `save_to_disk` folder or a Hub dataset."""
    source = entry.source
    if os.path.isdir(source) and any(os.path.isfile(os.path.join(source, f)) for f in METADATA_FILES):
        return load_caption_folder(source)
    saved = ("state.json", "dataset_dict.json")
    if os.path.isdir(source) and not any(os.path.isfile(os.path.join(source, f)) for f in saved):
        return load_image_folder(source)
    return load_dataset_split(source, entry.config, entry.split)


# ---------------------------------------------------------------------------------------------- running
def _columns(dataset: datasets.Dataset, name: str) -> tuple[str, str | None, str | None]:
    """(image, label, caption) columns of a dataset; the task follows from which of label / caption exists."""
    image = next((c for c, f in dataset.features.items() if isinstance(f, datasets.Image)), None)
    if image is None:
        raise ValueError(f"dataset {name!r} has no image column (a datasets.Image feature): {dataset.column_names}")
    label = next((c for c in LABEL_COLUMNS if c in dataset.column_names), None)
    label = label or next((c for c, f in dataset.features.items() if isinstance(f, datasets.ClassLabel)), None)
    caption = next((c for c in CAPTION_COLUMNS if c in dataset.column_names), None)
    if label is None and caption is None:
        raise ValueError(
            f"dataset {name!r} has neither a label column ({', '.join(LABEL_COLUMNS)} or a ClassLabel) for zero-shot "
            f"classification nor a caption column ({', '.join(CAPTION_COLUMNS)}) for retrieval: {dataset.column_names}"
        )
    return image, label, caption


def _caption_lines(row: dict, column: str) -> dict:
    return {column: [line.strip() for line in row[column].splitlines() if line.strip()]}


def benchmark_dataset(
    model: AlignerModel, processor, entry: BenchmarkDataset, batch_size: int = 64
) -> EvaluationResult:
    """Load one dataset and score it: zero-shot classification when it has a label column, else retrieval."""
    data = load_benchmark_dataset(entry)
    image, label, caption = _columns(data, entry.name)
    common = {"batch_size": batch_size, "dataset_name": entry.name, "dataset_split": entry.split}
    if label is not None:
        class_names, templates, origin = class_names_and_templates(entry, data, label)
        result = evaluate_zero_shot(
            model, processor, data, class_names, templates, image_column=image, label_column=label, **common
        )
        result.details = f"{result.details}; class names from {origin}"
        return result
    if data.features[caption] == datasets.Value("string"):  # one str per image: one caption per line
        data = data.map(_caption_lines, fn_kwargs={"column": caption}, desc="splitting captions")
    return evaluate_retrieval(model, processor, data, image_column=image, text_column=caption, **common)


def run_benchmark(
    model: AlignerModel,
    suite: Sequence[BenchmarkDataset | str],
    output_dir: str,
    processor=None,
    batch_size: int = 64,
) -> BenchmarkRun:
    """Score `model` on every dataset of `suite`, record each result on its card data, and write the table and plot.

    Args:
        model (`AlignerModel`): an aligner with its encoders attached.
        suite: `BenchmarkDataset`s, or specs for `BenchmarkDataset.parse` (`"name=source"`, a folder, a standard
            name).
        output_dir (`str`): where `benchmark.csv`, `benchmark.json` and `benchmark.png` are written.
        processor: the aligner's processor (default: `model.processor`).
        batch_size (`int`): images (and texts) per forward.

    Returns:
        `BenchmarkRun`: the results in suite order and the paths written (`files["csv" | "json" | "plot"]`). Each
        result is also on `model.model_card_data`, so `model.save_pretrained` lists it in the card's model-index.
    """
    processor = processor if processor is not None else model.processor
    if processor is None:
        raise ValueError("run_benchmark needs the aligner's processor: model.processor is None and none was given")
    entries = [BenchmarkDataset.parse(e) if isinstance(e, str) else e for e in suite]
    if not entries:
        raise ValueError("run_benchmark needs at least one dataset")
    names = [e.name for e in entries]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"dataset names must be unique (they name the results), got {duplicated} more than once")
    run = BenchmarkRun([benchmark_dataset(model, processor, entry, batch_size) for entry in entries])
    for result in run.results:
        model.model_card_data.add_evaluation(result)
    os.makedirs(output_dir, exist_ok=True)
    run.files = {
        "csv": write_table_csv(run, os.path.join(output_dir, "benchmark.csv")),
        "json": write_table_json(run, entries, os.path.join(output_dir, "benchmark.json")),
        "plot": plot_benchmark(run, os.path.join(output_dir, "benchmark.png")),
    }
    return run


# ---------------------------------------------------------------------------------------------- outputs
def write_table_csv(run: BenchmarkRun, path: str) -> str:
    """One row per dataset; metric columns are the union over datasets (blank where a task has no such metric)."""
    rows = run.rows()
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_table_json(run: BenchmarkRun, entries: Sequence[BenchmarkDataset], path: str) -> str:
    """The results with their protocol: per dataset its source, task, split, sample count, details and metrics."""
    payload = [
        {
            "dataset": entry.name,
            "source": entry.source,
            "task": result.task,
            "split": result.dataset_split,
            "num_samples": result.num_samples,
            "details": result.details,
            "metrics": dict(result),
        }
        for entry, result in zip(entries, run.results)
    ]
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
    return path


def plot_benchmark(run: BenchmarkRun, path: str) -> str:
    """Bar charts of the headline metrics (percent): one panel per task, one group of bars per dataset."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's backend alone

    tasks = [t for t in PLOTTED_METRICS if any(r.task == t for r in run.results)]
    figure = Figure(figsize=(8.0, 3.2 * len(tasks)), dpi=120)
    for panel, task in enumerate(tasks, start=1):
        axes = figure.add_subplot(len(tasks), 1, panel)
        results = [r for r in run.results if r.task == task]
        metrics = PLOTTED_METRICS[task]
        width = 0.8 / len(metrics)
        for i, metric in enumerate(metrics):
            positions = [d + (i - (len(metrics) - 1) / 2) * width for d in range(len(results))]
            bars = axes.bar(positions, [r[metric] for r in results], width, label=metric)
            axes.bar_label(bars, fmt="%.1f", fontsize="x-small")
        axes.set_xticks(range(len(results)), [r.dataset_name for r in results])
        axes.set_ylim(0, 105)
        axes.set_ylabel("percent")
        axes.set_title("zero-shot classification" if task == TASK_ZERO_SHOT else "image-text retrieval")
        axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never on them
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


__all__ = [
    "BenchmarkDataset",
    "BenchmarkRun",
    "benchmark_dataset",
    "class_names_and_templates",
    "clip_benchmark_table",
    "load_benchmark_dataset",
    "load_caption_folder",
    "load_image_folder",
    "plot_benchmark",
    "run_benchmark",
    "standard_class_names",
    "standard_templates",
    "write_table_csv",
    "write_table_json",
]
