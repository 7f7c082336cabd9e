"""The model card save_pretrained writes: valid YAML that round-trips through huggingface_hub, both encoders as
base models, a model-index equal to what was evaluated and recorded, and a body built from the training record."""

import os
import re

import datasets
import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

import hf_align
import hf_align.model.hub
from hf_align.methods.citations import ASIF, CLIP, PAL, bibtex_entries, join, merge_citations
from hf_align.model.card import (
    TASK_RETRIEVAL,
    TASK_ZERO_SHOT,
    AlignerModelCardData,
    card_data,
    describe_dataset,
    generate_model_card,
    record_evaluation,
    record_training_dataset,
)
from hf_align.regularizers import REGULARIZERS
from hf_align.regularizers.structure import StructureRegularizer
from hf_align.testing import digits_dataset, make_paired_task, save_tiny_text_encoder, save_tiny_vision_encoder

VISION_ID, TEXT_ID = "facebook/dinov2-small", "sentence-transformers/all-MiniLM-L6-v2"
VISION_SHA, TEXT_SHA = "e" * 40, "c" * 40


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A model on two tiny local encoders, evaluated zero-shot and on retrieval (both recorded by the caller, one
    through the card data, one through `record_evaluation`), then described as Hub encoders."""
    root = tmp_path_factory.mktemp("encoders")
    vision = save_tiny_vision_encoder(str(root / "vit"), "vit")
    text = save_tiny_text_encoder(str(root / "bert"))
    model = hf_align.AlignerModel.from_encoders(vision, text, projection_dim=8)
    data = digits_dataset(24)
    zero_shot = hf_align.evaluate_zero_shot(
        model, model.processor, data, templates=["a digit {}"], dataset_name="sklearn/digits", dataset_split="test"
    )
    retrieval = hf_align.evaluate_retrieval(
        model, model.processor, data, dataset_name="sklearn/digits", dataset_split="test"
    )
    assert model.config.training_summary == {}  # evaluations return their results, they do not record them
    model.model_card_data.add_evaluation(zero_shot)
    hf_align.record_evaluation(model, retrieval)
    # What from_encoders records for Hub encoders (id + resolved commit); the card only reads the config.
    model.config.update(
        {"vision_encoder": VISION_ID, "vision_revision": VISION_SHA, "text_encoder": TEXT_ID, "text_revision": TEXT_SHA}
    )
    return model, zero_shot, retrieval


@pytest.fixture(scope="module")
def saved_card(evaluated, tmp_path_factory):
    model, _, _ = evaluated
    folder = tmp_path_factory.mktemp("saved")
    model.save_pretrained(folder)
    return folder, ModelCard.load(folder / "README.md")


def test_card_lists_both_encoders_as_base_models(saved_card):
    _, card = saved_card
    assert card.data.base_model == [VISION_ID, TEXT_ID]
    assert card.data.base_model_relation == "adapter"
    assert card.data.library_name == "hf_align"
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert f"`{VISION_SHA}`" in card.text and f"`{TEXT_SHA}`" in card.text


def test_model_index_equals_the_evaluations(evaluated, saved_card):
    _, zero_shot, retrieval = evaluated
    _, card = saved_card
    expected = {(TASK_ZERO_SHOT, k): v for k, v in zero_shot.items()}
    expected.update({(TASK_RETRIEVAL, k): v for k, v in retrieval.items()})
    got = {}
    for result in card.data.eval_results:
        assert (result.dataset_type, result.dataset_name, result.dataset_split) == ("sklearn/digits",) * 2 + ("test",)
        got[(result.task_type, result.metric_type)] = result.metric_value
    assert got == expected  # exact: the YAML carries the floats as evaluated
    assert len(expected) == 3 + 9  # top1, top5, per-class recall; R@1/5/10 both ways + mean


def test_card_yaml_round_trips(saved_card):
    folder, card = saved_card
    text = (folder / "README.md").read_text(encoding="utf-8")
    header = yaml.safe_load(text.split("---\n")[1])
    name, results = model_index_to_eval_results(header["model-index"])
    assert name == os.fspath(folder)  # the usage snippet and model-index name the folder save_pretrained wrote
    reparsed = ModelCard(text)
    assert reparsed.data.to_dict() == card.data.to_dict()
    assert [(r.metric_type, r.metric_value) for r in results] == [
        (r.metric_type, r.metric_value) for r in card.data.eval_results
    ]


def test_card_body_reports_evaluations_and_setup(saved_card):
    folder, card = saved_card
    body = card.text
    assert "### Zero-shot image classification: sklearn/digits (test)" in body
    assert "24 images, 10 classes, 1 prompt template per class" in body
    assert "### Image-text retrieval: sklearn/digits (test)" in body
    assert "24 captions of 24 images" in body
    assert "| Layer (hidden-state index) | -1 | -1 |" in body
    assert "- **Aligner method:** `linear` with `projection_dim=8`" in body
    assert f'AlignerModel.from_pretrained("{folder}")' in body
    assert "no training record is available" in body


def test_saved_card_cites_the_method(saved_card):
    _, card = saved_card
    body = card.text
    assert "## Citation" in body
    assert "please cite the work it implements: the `linear` aligner cites `radford2021clip`." in body
    assert f"```bibtex\n{CLIP}\n```" in body  # the entry verbatim, in a bibtex block


def test_card_cites_method_and_regularisers_each_entry_once(tmp_path):
    model = hf_align.AlignerModel.from_feature_dims(8, 6, method="mlp", projection_dim=4, structure_weight=10.0)
    model.save_pretrained(tmp_path)
    body = ModelCard.load(tmp_path / "README.md").text
    assert (
        "the `mlp` aligner cites `radford2021clip`, `groger2025structure`; "
        "the `structure` regulariser cites `groger2025structure`." in body
    )
    citation = body.split("```bibtex\n")[1].split("\n```")[0]
    assert citation == f"{CLIP}\n\n{StructureRegularizer.citation}"  # STRUCTURE once, though cited twice
    assert [key for key, _ in bibtex_entries(citation)] == ["radford2021clip", "groger2025structure"]


# What docs/methods.md §13 says each component cites.
CITED = {
    "asif": ["norelli2023asif", "moschella2023relative"],
    "attention_pool": ["radford2021clip", "lee2019settransformer", "kim2026pal"],
    "codebook": ["duan2022codis", "caron2020swav"],
    "csa": ["li2025csa", "groger2025structure"],
    "freeze_align": ["maniparambil2025freezealign"],
    "linear": ["radford2021clip"],
    "mlp": ["radford2021clip", "groger2025structure"],
    "relative": ["moschella2023relative", "kim2026pal"],
    "sail": ["zhang2025sail", "radford2021clip"],
    "token_relative": ["kim2026pal", "moschella2023relative"],
    "structure": ["groger2025structure"],
}


def test_every_method_and_regulariser_cites_parsable_bibtex():
    components = {**dict(hf_align.METHODS.items()), **dict(REGULARIZERS.items())}
    assert {name: [key for key, _ in bibtex_entries(c.citation)] for name, c in components.items()} == CITED
    for name, component in components.items():
        for key, entry in bibtex_entries(component.citation):
            assert entry.count("{") == entry.count("}") and entry.endswith("}"), (name, key)
            assert re.search(r"^\s+title\s+=", entry, re.MULTILINE) and re.search(r"year\s+=\s+\{\d{4}\}", entry)
    keys, entries = merge_citations([("a", ""), ("b", ASIF), ("c", join(ASIF, PAL))])
    assert keys == [("b", ["norelli2023asif"]), ("c", ["norelli2023asif", "kim2026pal"])] and entries == [ASIF, PAL]
    message = r"a citation must be BibTeX entries \(each starting '@type\{key,'\), got 'CLIP"
    with pytest.raises(ValueError, match=message):
        bibtex_entries("CLIP, Radford et al. 2021")


def test_reevaluation_replaces_and_new_split_adds(evaluated):
    model, _, _ = evaluated
    before = len(model.config.training_summary["evaluations"])
    record_evaluation(model, TASK_RETRIEVAL, {"mean_R@1": 1.5}, dataset_name="sklearn/digits", dataset_split="test")
    assert len(model.config.training_summary["evaluations"]) == before
    record_evaluation(
        model, TASK_RETRIEVAL, {"mean_R@1": 2.5}, dataset_name="sklearn/digits", dataset_split="validation"
    )
    runs = model.config.training_summary["evaluations"]
    assert len(runs) == before + 1
    assert [r["metrics"] for r in runs[-2:]] == [{"mean_R@1": 1.5}, {"mean_R@1": 2.5}]


def test_local_encoders_are_not_base_models(tmp_path):
    model = hf_align.AlignerModel.from_encoders(
        save_tiny_vision_encoder(str(tmp_path / "vit"), "vit"),
        save_tiny_text_encoder(str(tmp_path / "bert")),
        projection_dim=4,
    )
    data = card_data(model)
    assert data.base_model is None and data.eval_results is None
    assert f"`{tmp_path / 'vit'}` (local folder)" in generate_model_card(model).text


def test_training_record_and_layer_selection_in_card(tmp_path):
    task = make_paired_task(n=300, vision_dim=16, text_dim=12, n_vision_layers=3, n_text_layers=2, shared_layers=(1, 0))
    model = hf_align.AlignerModel.from_feature_dims(16, 12, projection_dim=8)
    model.config.update({"vision_layer": "auto", "text_layer": "auto"})
    args = hf_align.AlignmentArguments(per_device_train_batch_size=64, max_steps=3, eval_fraction=0.2, logging_steps=1)
    record_training_dataset(model, name="org/pairs", split="train", num_rows=300)
    record_evaluation(model, TASK_RETRIEVAL, {"mean_R@1": 1.0}, dataset_name="org/pairs", dataset_split="test")
    hf_align.train(model, task.to_features(), args)
    # a new run keeps what describes the setup (data, layer selection) and forgets the old weights' evaluations
    assert sorted(model.config.training_summary) == [
        "best_step",
        "eval_pairs",
        "final_eval",
        "global_step",
        "hardware",
        "layer_selection",
        "mixed_precision",
        "train_datasets",
        "train_pairs",
        "train_runtime_s",
        "trainer",
        "training_args",
        "training_logs",
    ]
    model.save_pretrained(tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.datasets == ["org/pairs"] and card.data.eval_results is None
    body = card.text
    # the synthetic task plants the shared latent in vision layer 1 / text layer 0: selection finds and explains it
    assert "vision layer **1** and text layer **0** give the highest mutual k-NN alignment" in body
    assert "| Vision layer \\ text layer | 0 | 1 |" in body
    assert "| [org/pairs](https://huggingface.co/datasets/org/pairs) | train | 300 |" in body
    assert "| Training pairs | 240 |" in body and "| Validation pairs | 60 |" in body
    assert "| Optimiser steps | 3 |" in body
    assert f"| Hardware | cpu ({os.cpu_count()} cores) |" in body
    assert "| `max_steps` | `3` |" in body and "| `eval_fraction` | `0.2` |" in body
    # the record travels in config.json: the reloaded model writes the same card
    reloaded = hf_align.AlignerModel.from_pretrained(tmp_path / "out", load_encoders=False)
    assert generate_model_card(reloaded, os.fspath(tmp_path / "out")).content == card.content


def test_describe_dataset_reads_hub_origin():
    revision = "0123456789abcdef0123456789abcdef01234567"
    info = datasets.DatasetInfo(
        dataset_name="flickr30k", download_checksums={f"hf://datasets/nlphuji/flickr30k@{revision}/test.parquet": {}}
    )
    dataset = datasets.Dataset.from_dict({"caption": ["a", "b", "c"]}, info=info, split="test")
    assert describe_dataset(dataset) == {
        "name": "flickr30k",
        "split": "test",
        "id": "nlphuji/flickr30k",
        "revision": revision,
        "num_rows": 3,
    }
    assert describe_dataset(dataset, name="Flickr30k (Karpathy)", split="test[:2]")["name"] == "Flickr30k (Karpathy)"


def test_card_data_records_an_evaluation_result(evaluated):
    """What an evaluate_* function returns carries its task, data and protocol; explicit arguments win over them."""
    model, zero_shot, _ = evaluated
    card = model.model_card_data
    assert isinstance(card, AlignerModelCardData) and card.model is model
    entry = card.add_evaluation(zero_shot, dataset_split="validation", details="a re-run")
    assert entry == {
        "task": TASK_ZERO_SHOT,
        "dataset": {"name": "sklearn/digits", "id": "sklearn/digits", "split": "validation", "num_rows": 24},
        "metrics": dict(zero_shot),
        "details": "a re-run",
    }
    assert model.config.training_summary["evaluations"][-1] == entry  # stored where config.json keeps it
    zero_shot_runs = [e for e in card.summary["evaluations"] if e["task"] == TASK_ZERO_SHOT]
    assert [e["dataset"]["split"] for e in zero_shot_runs] == ["test", "validation"]


def test_bad_records_rejected(evaluated):
    model, zero_shot, _ = evaluated
    with pytest.raises(ValueError, match=r"task must be one of \['image-segmentation', .*got 'retrieval'"):
        record_evaluation(model, "retrieval", {"mean_R@1": 1.0})
    with pytest.raises(ValueError, match=r"metric 'top1' must be a number, got 'high'"):
        record_evaluation(model, TASK_ZERO_SHOT, {"top1": "high"})
    with pytest.raises(TypeError, match=r"metrics must be a mapping of metric name -> number, got NoneType"):
        record_evaluation(model, TASK_ZERO_SHOT)
    with pytest.raises(
        TypeError, match=r"takes what an evaluate_\* function returned \(alone\).*got task=EvaluationResult"
    ):
        model.model_card_data.add_evaluation(zero_shot, {"top1": 1.0})
    with pytest.raises(TypeError, match=r"or a task id with metrics; got task=dict and metrics=NoneType"):
        record_evaluation(model, {"top1": 1.0})
    with pytest.raises(ValueError, match="a training dataset needs a name: pass name=..."):
        record_training_dataset(model)


def test_upload_is_reexported_from_the_hub_module():
    assert hf_align.model.card.upload_aligner is hf_align.model.hub.upload_aligner
