"""transformers.Trainer trains an aligner on a feature cache with FeatureCollator and no subclassing; evaluation
gives a loss; CardDataCallback runs the method hooks and records the run for the model card."""

import os

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

import hf_align
from hf_align.configuration import TASK_RETRIEVAL
from hf_align.testing import make_paired_task
from hf_align.trainer_callback import CardDataCallback, non_default_training_args


def training_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=60,
        per_device_eval_batch_size=60,
        num_train_epochs=4,
        learning_rate=1e-2,
        logging_steps=2,
        eval_strategy="epoch",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


@pytest.fixture(scope="module")
def views():
    """The model-facing view of a 300-pair synthetic cache, split 240 / 60 (features_for keeps image_id)."""
    task = make_paired_task(n=300, vision_dim=24, text_dim=16, seed=0)
    model = hf_align.AlignerModel.from_feature_dims(24, 16, projection_dim=16)
    view = hf_align.features_for(model, task.to_features())
    return view.select(range(240)), view.select(range(240, 300))


def test_trainer_trains_with_feature_collator_and_records_the_run(views, tmp_path):
    train, evaluation = views
    model = hf_align.AlignerModel.from_feature_dims(24, 16, projection_dim=16)
    steps = []
    original = model.aligner.after_optimizer_step
    model.aligner.after_optimizer_step = lambda: (steps.append(1), original())[1]
    args = training_args(tmp_path, gradient_accumulation_steps=2)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=hf_align.FeatureCollator(),
        callbacks=[CardDataCallback()],
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(eval_losses) == 4  # one evaluation per epoch, each with a loss
    assert losses[-1] < 0.5 * losses[0]  # 240 pairs, 4 batches of 60 per epoch, accumulation 2 -> 8 steps
    assert eval_losses[-1] < eval_losses[0]
    # after_optimizer_step ran once per optimiser step, not per micro-batch
    assert trainer.state.global_step == 8 and len(steps) == 8

    summary = model.config.training_summary
    assert summary["trainer"] == "transformers.Trainer"
    assert (summary["train_pairs"], summary["eval_pairs"], summary["global_step"]) == (240, 60, 8)
    assert summary["hardware"] == f"cpu ({os.cpu_count()} cores)"
    assert summary["mixed_precision"] == "no"
    assert summary["final_eval"] == {"eval_loss": pytest.approx(eval_losses[-1])}
    assert summary["training_args"]["gradient_accumulation_steps"] == 2
    assert summary["training_args"]["learning_rate"] == 1e-2
    assert "output_dir" not in summary["training_args"] and "report_to" not in summary["training_args"]
    logged = [row for row in summary["training_logs"] if "validation_loss" in row]
    assert [row["validation_loss"] for row in logged] == pytest.approx(eval_losses)
    assert [row["training_loss"] for row in summary["training_logs"] if "training_loss" in row] == pytest.approx(losses)

    model.save_pretrained(tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "generated_from_trainer" in card.data.tags
    assert "| Trained with | transformers.Trainer |" in card.text
    assert "| Epoch | Step | Training loss | Validation loss |" in card.text


def test_evaluation_step_returns_a_loss(views, tmp_path):
    train, evaluation = views
    model = hf_align.AlignerModel.from_feature_dims(24, 16, projection_dim=16)
    args = training_args(tmp_path, eval_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=hf_align.FeatureCollator())
    batch = hf_align.FeatureCollator()([evaluation[i] for i in range(8)])
    loss, _, _ = trainer.prediction_step(model, batch, prediction_loss_only=True)
    expected = model(**batch).loss
    assert loss.item() == pytest.approx(expected.item())
    # without the collator's flag the model is in inference mode: Trainer would get no loss
    assert model(vision_features=batch["vision_features"], text_features=batch["text_features"]).loss is None


def test_codebook_is_initialised_from_data_and_trains_under_trainer(views, tmp_path):
    train, _ = views
    model = hf_align.AlignerModel.from_feature_dims(
        24, 16, method="codebook", projection_dim=8, num_codes=8, kmeans_iters=2
    )
    seen = []
    original_init = model.aligner.init_from_data

    def spy(vision, text, **kwargs):
        seen.append((vision.shape, text.shape, kwargs["seed"]))
        original_init(vision, text, **kwargs)

    model.aligner.init_from_data = spy
    steps = []
    original_step = model.aligner.after_optimizer_step
    model.aligner.after_optimizer_step = lambda: (steps.append(1), original_step())[1]  # the EMA teacher update
    callback = CardDataCallback(init_samples=100)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, num_train_epochs=2, eval_strategy="no", seed=7),
        train_dataset=train,
        data_collator=hf_align.FeatureCollator(),
        callbacks=[callback],
    )
    trainer.train()
    assert seen == [(torch.Size([100, 24]), torch.Size([100, 16]), 7)]
    assert len(steps) == trainer.state.global_step == 8
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


def test_resumed_run_is_not_reinitialised(views, tmp_path):
    """A resumed run (global_step > 0) keeps the checkpoint's weights; a fresh one initialises from data. The card
    forgets what described the old weights and keeps what describes the setup."""
    train, _ = views
    model = hf_align.AlignerModel.from_feature_dims(24, 16, method="codebook", projection_dim=8, num_codes=8)
    before = {k: v.clone() for k, v in model.aligner_state_dict().items()}
    loader = torch.utils.data.DataLoader(train)
    callback = CardDataCallback(init_samples=50)
    card = model.model_card_data
    card.add_training_dataset(name="org/pairs", split="train")
    card.add_evaluation(TASK_RETRIEVAL, {"mean_R@1": 1.0}, dataset_name="org/pairs")  # of the old weights

    callback.on_train_begin(
        training_args(tmp_path), TrainerState(global_step=5), TrainerControl(), model=model, train_dataloader=loader
    )
    after = model.aligner_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no data-dependent restart: weights untouched
    assert model.config.training_summary == {
        "train_datasets": [{"name": "org/pairs", "id": "org/pairs", "split": "train"}]
    }

    callback.on_train_begin(
        training_args(tmp_path), TrainerState(global_step=0), TrainerControl(), model=model, train_dataloader=loader
    )
    fresh = model.aligner_state_dict()
    # a fresh run: the codebook becomes the k-means of 50 training pairs (the heads are left as they are)
    assert [k for k in before if not torch.equal(before[k], fresh[k])] == ["aligner.codebook"]


def test_data_initialised_method_needs_a_dataset_view(tmp_path):
    model = hf_align.AlignerModel.from_feature_dims(24, 16, method="codebook", projection_dim=8, num_codes=8)
    loader = torch.utils.data.DataLoader([{"vision_features": [0.0] * 24, "text_features": [0.0] * 16}])
    with pytest.raises(
        ValueError, match=r"method 'codebook' initialises from data, but the Trainer's training set is a list"
    ):
        CardDataCallback().on_train_begin(
            training_args(tmp_path), TrainerState(), TrainerControl(), model=model, train_dataloader=loader
        )


def test_callback_arguments_checked(tmp_path):
    with pytest.raises(ValueError, match="init_samples must be a positive int, got 0"):
        CardDataCallback(init_samples=0)
    with pytest.raises(TypeError, match="CardDataCallback works with hf_align.AlignerModel, got Linear"):
        CardDataCallback().on_step_end(
            training_args(tmp_path), TrainerState(), TrainerControl(), model=torch.nn.Linear(2, 2)
        )


def test_non_default_arguments_leave_out_paths(tmp_path):
    args = training_args(tmp_path, warmup_steps=3)
    assert non_default_training_args(args) == {
        "per_device_train_batch_size": 60,
        "per_device_eval_batch_size": 60,
        "num_train_epochs": 4,
        "learning_rate": 0.01,
        "eval_strategy": "epoch",
        "seed": 0,
        "warmup_steps": 3,
    }
