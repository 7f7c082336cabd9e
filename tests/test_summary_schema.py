"""A malformed `training_summary` (it travels in someone else's config.json) never stops the model from loading, and
rendering a card from it raises a ValueError naming the field instead of a bare error from inside the template."""

from __future__ import annotations

import pytest

from hf_align import AlignerModel
from hf_align.model.card import generate_model_card
from hf_align.model.summary_schema import check_training_summary

GOOD_RUN = {"task": "zero-shot-image-classification", "metrics": {"top1": 0.5}, "dataset": {"name": "digits"}}


@pytest.mark.parametrize(
    "summary, field",
    [
        ("not a mapping", r"training_summary must be a mapping, got str"),
        ({"evaluations": "x"}, r"training_summary\['evaluations'\] must be a list, got str"),
        ({"evaluations": ["x"]}, r"training_summary\['evaluations'\]\[0\] must be a mapping"),
        ({"evaluations": [{**GOOD_RUN, "task": "bogus"}]}, r"\['evaluations'\]\[0\]\['task'\] must be one of"),
        ({"evaluations": [{**GOOD_RUN, "metrics": None}]}, r"\['metrics'\] must be a mapping of metric names"),
        ({"evaluations": [{**GOOD_RUN, "metrics": {"top1": "high"}}]}, r"\['metrics'\]\['top1'\] must be a number"),
        ({"evaluations": [{**GOOD_RUN, "metrics": {"top1": True}}]}, r"\['metrics'\]\['top1'\] must be a number"),
        ({"evaluations": [{**GOOD_RUN, "dataset": {"split": 3}}]}, r"\['dataset'\]\['split'\] must be str or None"),
        ({"train_datasets": [{"id": ["a"]}]}, r"\['train_datasets'\]\[0\]\['id'\] must be str or None, got list"),
        ({"final_eval": [1]}, r"training_summary\['final_eval'\] must be a mapping"),
        ({"train_pairs": "many"}, r"training_summary\['train_pairs'\] must be int, got str 'many'"),
        ({"training_logs": [1]}, r"training_summary\['training_logs'\]\[0\] must be a mapping"),
        (
            {"layer_selection": {"metric": "cka"}},
            r"\['layer_selection'\]\['vision_layers'\] must be list, got NoneType",
        ),
    ],
)
def test_a_malformed_summary_is_named_by_field(summary, field):
    with pytest.raises(ValueError, match=field):
        check_training_summary(summary)


def test_a_model_with_a_malformed_summary_loads_runs_and_refuses_only_to_render_its_card(tmp_path):
    model = AlignerModel.from_feature_dims(8, 8, projection_dim=4)
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config_path.write_text(
        config_path.read_text().replace('"training_summary": {}', '"training_summary": {"evaluations": [{"task": 1}]}')
    )
    loaded = AlignerModel.from_pretrained(tmp_path, load_encoders=False)
    assert loaded.config.training_summary == {"evaluations": [{"task": 1}]}
    with pytest.raises(ValueError, match=r"training_summary\['evaluations'\]\[0\]\['task'\] must be one of"):
        generate_model_card(loaded)


def test_the_summary_a_real_run_records_passes(tmp_path):
    from hf_align import AlignmentArguments, train
    from hf_align.testing import make_paired_task

    task = make_paired_task(n=64, vision_dim=8, text_dim=8, n_vision_layers=1, n_text_layers=1)
    model = AlignerModel.from_feature_dims(8, 8, projection_dim=4)
    train(model, task.to_features(with_labels=False), AlignmentArguments(output_dir=str(tmp_path), max_steps=3))
    model.model_card_data.add_evaluation(
        "zero-shot-image-classification", {"top1": 0.25}, dataset_name="digits", dataset_split="test"
    )
    check_training_summary(model.config.training_summary)
    assert "Top-1 accuracy" in str(generate_model_card(model))
