"""`hf-align benchmark` / `hf_align.evaluation.benchmark`: suites of zero-shot and retrieval datasets from local folders, class
names and templates from clip_benchmark's tables, the results on the card, the table and the plot."""

import csv
import json
import os
import shutil
import sys

import clip_benchmark
import datasets
import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError
from PIL import Image

from hf_align import AlignerModel, evaluate_retrieval, evaluate_zero_shot
from hf_align.commands.cli import main
from hf_align.evaluation.benchmark import (
    BenchmarkDataset,
    class_names_and_templates,
    clip_benchmark_table,
    load_caption_folder,
    load_image_folder,
    run_benchmark,
    standard_class_names,
    standard_templates,
)
from hf_align.model.configuration import TASK_RETRIEVAL, TASK_ZERO_SHOT
from hf_align.model.templates import DEFAULT_TEMPLATES
from hf_align.testing import DIGIT_NAMES, digits_dataset

FILES = (("csv", "csv"), ("json", "json"), ("plot", "png"))
TABLES = os.path.join(os.path.dirname(clip_benchmark.__file__), "datasets")


def clip_benchmark_json(filename: str) -> dict:
    with open(os.path.join(TABLES, filename), encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def aligner_dir(tiny_vit, tiny_bert, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("benchmark") / "aligner")
    torch.manual_seed(0)
    AlignerModel.from_encoders(tiny_vit, tiny_bert, projection_dim=8).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def digits():
    return digits_dataset(24)


@pytest.fixture(scope="module")
def image_folder(digits, tmp_path_factory):
    """24 digits as `<root>/<digit name>/<i>.png`; folders sort alphabetically (eight, five, four, ...)."""
    root = tmp_path_factory.mktemp("digits")
    for i, row in enumerate(digits):
        os.makedirs(root / DIGIT_NAMES[row["label"]], exist_ok=True)
        row["image"].save(root / DIGIT_NAMES[row["label"]] / f"{i:02d}.png")
    return str(root)


@pytest.fixture(scope="module")
def caption_folder(digits, tmp_path_factory):
    """12 digits in `images/`, `metadata.jsonl`: even images get two captions (two rows, or one list), odd ones one."""
    root = tmp_path_factory.mktemp("captions")
    os.makedirs(root / "images")
    with open(root / "metadata.jsonl", "w", encoding="utf-8") as handle:
        for i in range(12):
            digits[i]["image"].save(root / "images" / f"{i}.png")
            name = DIGIT_NAMES[digits[i]["label"]]
            record = {"file_name": f"images/{i}.png", "caption": f"a handwritten {name}, number {i}"}
            handle.write(json.dumps(record) + "\n")
            if i % 4 == 0:
                handle.write(json.dumps({**record, "caption": f"the digit {name} drawn by hand, {i}"}) + "\n")
            elif i % 4 == 2:
                handle.write(json.dumps({**record, "caption": [f"{name} on paper, {i}"]}) + "\n")
    return str(root)


def test_load_image_folder_reads_classes_in_sorted_order(image_folder, digits, tmp_path):
    data = load_image_folder(image_folder)
    names = sorted({DIGIT_NAMES[label] for label in digits["label"]})
    assert data.features["label"].names == names
    expected = sorted((DIGIT_NAMES[label], f"{i:02d}.png") for i, label in enumerate(digits["label"]))
    assert [(names[row["label"]], os.path.basename(row["image"].filename)) for row in data] == expected
    assert data[0]["image"].size == (32, 32)

    with pytest.raises(ValueError, match=r"has no class subfolders"):
        load_image_folder(str(tmp_path))
    os.makedirs(tmp_path / "cat")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"class folder '.*cat' holds no images \(\.bmp, \.gif"):
        load_image_folder(str(tmp_path))


def test_load_caption_folder_groups_captions_per_image(caption_folder, tmp_path):
    data = load_caption_folder(caption_folder)
    assert len(data) == 12
    by_file = {os.path.basename(row["image"].filename): row["caption"] for row in data}
    with open(os.path.join(caption_folder, "metadata.jsonl"), encoding="utf-8") as handle:
        first = json.loads(handle.readline())
    assert by_file["0.png"][0] == first["caption"] and len(by_file["0.png"]) == 2
    assert len(by_file["1.png"]) == 1 and len(by_file["2.png"]) == 2 and by_file["2.png"][1].endswith("on paper, 2")

    # the CSV form: one row per caption
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), "white").save(tmp_path / "b.png")
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,black\nb.png,white\na.png,dark\n")
    data = load_caption_folder(str(tmp_path))
    assert [(os.path.basename(r["image"].filename), r["caption"]) for r in data] == [
        ("a.png", ["black", "dark"]),
        ("b.png", ["white"]),
    ]
    (tmp_path / "metadata.csv").write_text("file_name,text\nc.png,missing\n")
    with pytest.raises(ValueError, match=r"metadata.csv record 1 names 'c.png', which is not a file in"):
        load_caption_folder(str(tmp_path))
    (tmp_path / "metadata.csv").write_text("image,text\na.png,black\n")
    with pytest.raises(ValueError, match=r"record 1 needs `file_name` and a caption column .* has \['image', 'text'"):
        load_caption_folder(str(tmp_path))
    (tmp_path / "metadata.csv").unlink()
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": [1]}) + "\n")
    with pytest.raises(ValueError, match=r"record 1: caption must be a non-empty str or list of str, got \[1\]"):
        load_caption_folder(str(tmp_path))


def test_dataset_specs(image_folder):
    assert BenchmarkDataset.parse("mine=user/data", split="validation") == BenchmarkDataset(
        "mine", "user/data", "validation"
    )
    assert BenchmarkDataset.parse(image_folder + "/") == BenchmarkDataset(
        os.path.basename(image_folder), image_folder + "/"
    )
    assert BenchmarkDataset.parse("cifar10").source == "clip-benchmark/wds_cifar10"
    assert BenchmarkDataset.parse("vtab/pets").source == "clip-benchmark/wds_vtab-pets"
    for bad in ("=user/data", "name=", ""):
        with pytest.raises(ValueError, match="a dataset is 'name=source', a folder or a standard name"):
            BenchmarkDataset.parse(bad)


def test_class_names_and_templates_come_from_clip_benchmark_for_standard_names(image_folder, tmp_path):
    names = clip_benchmark_json("en_classnames.json")
    templates = clip_benchmark_json("en_zeroshot_classification_templates.json")
    ten = datasets.Dataset.from_dict(
        {"label": [0]}, features=datasets.Features({"label": datasets.ClassLabel(names=DIGIT_NAMES)})
    )
    # mnist: class names and templates from clip_benchmark, placeholders rewritten from {c} to {}
    got = class_names_and_templates(BenchmarkDataset("mnist", "x"), ten, "label")
    assert got == (names["mnist"], [t.replace("{c}", "{}") for t in templates["mnist"]], "clip_benchmark")
    assert all("{}" in t and "{c}" not in t for t in got[1])
    # cifar10: templates only (its class names come from its torchvision loader, so from the data here)
    got = class_names_and_templates(BenchmarkDataset("cifar10", "x"), ten, "label")
    assert got == (DIGIT_NAMES, standard_templates("cifar10"), "the dataset") and len(got[1]) == 18
    # any other name: the data's names and hf_align's templates
    assert class_names_and_templates(BenchmarkDataset("mine", "x"), ten, "label") == (
        DIGIT_NAMES,
        DEFAULT_TEMPLATES,
        "the dataset",
    )
    with pytest.raises(ValueError, match=r"dataset 'pets' has 10 classes but clip_benchmark names 37: \['Abyssinian'"):
        class_names_and_templates(BenchmarkDataset("pets", "x"), ten, "label")
    ints = ten.cast_column("label", datasets.Value("int64"))
    with pytest.raises(ValueError, match=r"no class names for dataset 'mine': its column 'label' is not a ClassLabel"):
        class_names_and_templates(BenchmarkDataset("mine", "x"), ints, "label")

    # clip_benchmark's webdataset text files beside the data win
    (tmp_path / "classnames.txt").write_text("\n".join(f"digit {n}" for n in DIGIT_NAMES) + "\n\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a photo of {c}.\nart of {c}.\n")
    got = class_names_and_templates(BenchmarkDataset("mnist", str(tmp_path)), ints, "label")
    assert got == ([f"digit {n}" for n in DIGIT_NAMES], ["a photo of {}.", "art of {}."], "classnames.txt")


def test_without_clip_benchmark_the_library_templates_apply(monkeypatch):
    ten = datasets.Dataset.from_dict(
        {"label": [0]}, features=datasets.Features({"label": datasets.ClassLabel(names=DIGIT_NAMES)})
    )
    clip_benchmark_table.cache_clear()
    try:
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, "clip_benchmark", None)  # `import clip_benchmark` raises ModuleNotFoundError
            assert clip_benchmark_table("en_classnames.json") is None
            assert standard_class_names("mnist") is None and standard_templates("cifar10") is None
            assert class_names_and_templates(BenchmarkDataset("cifar10", "x"), ten, "label")[1] == DEFAULT_TEMPLATES
    finally:
        clip_benchmark_table.cache_clear()
    assert standard_class_names("mnist") == [str(i) for i in range(10)]


def test_a_hub_datasets_text_files_are_fetched_from_its_repo(tmp_path, monkeypatch):
    names_file = tmp_path / "classnames.txt"
    names_file.write_text("airplane\nautomobile\n")
    asked = []

    def fake_download(repo_id, filename, repo_type=None):
        asked.append((repo_id, filename, repo_type))
        if filename == "classnames.txt":
            return str(names_file)
        raise EntryNotFoundError(f"{filename} not in {repo_id}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    data = datasets.Dataset.from_dict({"cls": [0, 1]})
    got = class_names_and_templates(BenchmarkDataset.parse("cifar10"), data, "cls")
    assert got == (["airplane", "automobile"], standard_templates("cifar10"), "classnames.txt")
    assert asked == [
        ("clip-benchmark/wds_cifar10", "classnames.txt", "dataset"),
        ("clip-benchmark/wds_cifar10", "zeroshot_classification_templates.txt", "dataset"),
    ]


def test_run_benchmark_scores_records_and_writes(aligner_dir, image_folder, caption_folder, tmp_path):
    model = AlignerModel.from_pretrained(aligner_dir)
    run = run_benchmark(model, [image_folder, f"captions={caption_folder}"], str(tmp_path / "out"), batch_size=8)

    # the numbers are hf_align's evaluations of the same data
    folder_data = load_image_folder(image_folder)
    names = folder_data.features["label"].names
    zero_shot, retrieval = run.results
    assert dict(zero_shot) == evaluate_zero_shot(model, model.processor, folder_data, names, DEFAULT_TEMPLATES)
    assert dict(retrieval) == evaluate_retrieval(model, model.processor, load_caption_folder(caption_folder))
    folder_name = os.path.basename(image_folder)
    assert (zero_shot.task, zero_shot.dataset_name, zero_shot.dataset_split) == (TASK_ZERO_SHOT, folder_name, "test")
    assert zero_shot.details.endswith("80 prompt templates per class; class names from the dataset")
    assert (retrieval.task, retrieval.dataset_name, retrieval.num_samples) == (TASK_RETRIEVAL, "captions", 12)

    # recorded on the card data, and in the saved card's model-index
    recorded = model.model_card_data.summary["evaluations"]
    assert [(e["task"], e["dataset"]["name"], e["metrics"]) for e in recorded] == [
        (TASK_ZERO_SHOT, folder_name, dict(zero_shot)),
        (TASK_RETRIEVAL, "captions", dict(retrieval)),
    ]
    model.save_pretrained(str(tmp_path / "saved"))
    card = huggingface_hub.ModelCard.load(str(tmp_path / "saved" / "README.md"))
    listed = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert listed[(folder_name, "top1")] == pytest.approx(zero_shot["top1"])
    assert listed[("captions", "text_to_image_R@5")] == pytest.approx(retrieval["text_to_image_R@5"])

    # the table, as CSV and JSON
    with open(run.files["csv"], encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["dataset"], r["task"], r["split"], r["num_samples"]) for r in rows] == [
        (folder_name, TASK_ZERO_SHOT, "test", "24"),
        ("captions", TASK_RETRIEVAL, "test", "12"),
    ]
    assert float(rows[0]["top5"]) == zero_shot["top5"] and rows[0]["mean_R@1"] == ""
    assert float(rows[1]["mean_R@10"]) == retrieval["mean_R@10"] and rows[1]["top1"] == ""
    with open(run.files["json"], encoding="utf-8") as handle:
        table = json.load(handle)
    assert [(t["dataset"], t["source"], t["metrics"]) for t in table] == [
        (folder_name, image_folder, dict(zero_shot)),
        ("captions", caption_folder, dict(retrieval)),
    ]
    # the plot: a PNG with one panel per task
    with Image.open(run.files["plot"]) as plot:
        assert (plot.format, plot.size) == ("PNG", (960, 768))

    with pytest.raises(ValueError, match=r"dataset names must be unique .* got \['a'\] more than once"):
        run_benchmark(model, [f"a={image_folder}", f"a={caption_folder}"], str(tmp_path / "dup"))
    with pytest.raises(ValueError, match="run_benchmark needs at least one dataset"):
        run_benchmark(model, [], str(tmp_path / "none"))


def test_webdataset_columns_and_text_files_in_a_saved_dataset(aligner_dir, digits, tmp_path):
    """clip_benchmark's webdataset layout (`webp`/`cls` or `txt` with one caption per line, `classnames.txt`), as a
    `datasets.Dataset` saved to disk."""
    model = AlignerModel.from_pretrained(aligner_dir)
    subset = digits.select(range(8))
    images, labels = subset[:]["image"], subset[:]["label"]
    classes = datasets.Dataset.from_dict({"webp": images, "cls": labels}).cast_column("webp", datasets.Image())
    classes.save_to_disk(str(tmp_path / "classes"))
    (tmp_path / "classes" / "classnames.txt").write_text("\n".join(DIGIT_NAMES))
    captions = [f"{subset[i]['caption']}, {i}\nsample {i}" for i in range(8)]
    pairs = datasets.Dataset.from_dict({"jpg": images, "txt": captions}).cast_column("jpg", datasets.Image())
    pairs.save_to_disk(str(tmp_path / "pairs"))

    run = run_benchmark(model, [f"wds={tmp_path / 'classes'}", f"pairs={tmp_path / 'pairs'}"], str(tmp_path / "out"))
    expected = evaluate_zero_shot(
        model, model.processor, classes, DIGIT_NAMES, DEFAULT_TEMPLATES, image_column="webp", label_column="cls"
    )
    assert dict(run.results[0]) == expected and run.results[0].details.endswith("class names from classnames.txt")
    split = pairs.map(lambda row: {"txt": row["txt"].split("\n")})
    assert dict(run.results[1]) == evaluate_retrieval(model, model.processor, split, "jpg", "txt")
    assert run.results[1].details == "16 captions of 8 images, every image against every caption"


def test_benchmark_command(aligner_dir, image_folder, caption_folder, tmp_path, capsys):
    folder = str(tmp_path / "aligner")
    shutil.copytree(aligner_dir, folder)
    out = str(tmp_path / "out")
    suite = f"digits={image_folder},{caption_folder}"
    argv = ["benchmark", "--model", folder, "--datasets", suite, "--output_dir", out]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"digits ({TASK_ZERO_SHOT}, test, 24 images): top1 ")
    assert printed[1].startswith(f"{os.path.basename(caption_folder)} ({TASK_RETRIEVAL}, test, 12 images): ")
    assert printed[2:] == [f"{kind}: {os.path.join(out, f'benchmark.{ext}')}" for kind, ext in FILES]
    with open(os.path.join(out, "benchmark.json"), encoding="utf-8") as handle:
        table = json.load(handle)
    assert f"top1 {table[0]['metrics']['top1']:.2f}," in printed[0]
    # the local aligner's card now lists both runs in its model-index
    card = huggingface_hub.ModelCard.load(os.path.join(folder, "README.md"))
    listed = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert listed[("digits", "top1")] == pytest.approx(table[0]["metrics"]["top1"])
    assert listed[(os.path.basename(caption_folder), "mean_R@1")] == pytest.approx(table[1]["metrics"]["mean_R@1"])
