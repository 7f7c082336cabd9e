"""transformers.Trainer trains an aligner on a feature cache with FeatureCollator and no subclassing; evaluation
gives a loss; CardDataCallback runs the method hooks and records the run for the model card. AlignerTrainer's
create_model_card() and push_to_hub() (against the stand-in Hub of tests/hub_server.py) write hf_align's card."""

import json
import os

import pytest
import torch
import transformers.utils.hub
from hub_server import StandInHub, use_hub
from huggingface_hub import ModelCard
from safetensors.torch import load as load_safetensors
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

import hf_align
from hf_align.integrations.trainer import AlignerTrainer, CardDataCallback, non_default_training_args
from hf_align.model.configuration import TASK_RETRIEVAL
from hf_align.testing import make_paired_task

# Hub encoders as from_encoders records them (id + resolved commit): the card's base_model and revisions.
VISION_ID, TEXT_ID = "facebook/dinov2-small", "sentence-transformers/all-MiniLM-L6-v2"
VISION_SHA, TEXT_SHA = "e" * 40, "c" * 40


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
def cache():
    """A 300-pair synthetic feature cache (24-d vision, 16-d text features)."""
    return make_paired_task(n=300, vision_dim=24, text_dim=16, seed=0).to_features()


@pytest.fixture(scope="module")
def views(cache):
    """The model-facing view of the cache, split 240 / 60 (features_for keeps image_id)."""
    model = hf_align.AlignerModel.from_feature_dims(24, 16, projection_dim=16)
    view = hf_align.features_for(model, cache)
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


# ---------------------------------------------------------------------------------------------- AlignerTrainer cards
@pytest.fixture
def stand_in_hub(monkeypatch):
    """The stand-in Hub, with transformers' shared HfApi (its endpoint is read once, when it is made) made again."""
    hub = StandInHub()
    use_hub(monkeypatch, endpoint=hub.url)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
    yield hub
    hub.close()


def hub_aligner() -> hf_align.AlignerModel:
    """An aligner for the synthetic features, described as built on two Hub encoders at pinned commits."""
    model = hf_align.AlignerModel.from_feature_dims(24, 16, projection_dim=16)
    model.config.update(
        {"vision_encoder": VISION_ID, "vision_revision": VISION_SHA, "text_encoder": TEXT_ID, "text_revision": TEXT_SHA}
    )
    return model


def trained_aligner_trainer(views, cache, tmp_path, **overrides) -> tuple[AlignerTrainer, dict]:
    """An AlignerTrainer run (2 epochs) with the held-out retrieval recorded on the card: (trainer, its metrics)."""
    train, evaluation = views
    model = hub_aligner()
    trainer = AlignerTrainer(
        model=model,
        args=training_args(tmp_path, num_train_epochs=2, **overrides),
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=hf_align.FeatureCollator(),
    )
    trainer.train()
    metrics = hf_align.evaluate_retrieval(model, dataset=cache.select(range(240, 300)), dataset_name="synthetic-pairs")
    model.model_card_data.add_evaluation(metrics)
    return trainer, metrics


def check_hf_align_card(card: ModelCard, model_id: str, metrics: dict) -> None:
    """`card` is hf_align's card of the trained aligner (not transformers' generic Trainer card) naming `model_id`."""
    assert card.data.library_name == "hf_align"
    assert card.data.base_model == [VISION_ID, TEXT_ID] and card.data.base_model_relation == "adapter"
    assert f"| Revision | `{VISION_SHA}` | `{TEXT_SHA}` |" in card.text
    assert "joined by a small trained `linear` aligner fitted on 240 image–text pairs" in card.text
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == metrics
    assert card.data.to_dict()["model-index"][0]["name"] == model_id
    assert f'AlignerModel.from_pretrained("{model_id}")' in card.text
    assert "| Trained with | transformers.Trainer |" in card.text and "generated_from_trainer" in card.data.tags
    assert "More information needed" not in card.text  # the generic card's placeholder


def test_aligner_trainer_create_model_card_writes_the_hf_align_card(views, cache, tmp_path):
    trainer, metrics = trained_aligner_trainer(views, cache, tmp_path)
    # no callbacks were given: AlignerTrainer added the one CardDataCallback that records the run
    assert sum(isinstance(c, CardDataCallback) for c in trainer.callback_handler.callbacks) == 1
    model = trainer.model
    assert model.config.training_summary["global_step"] == 8  # 240 pairs, batches of 60, 2 epochs

    trainer.create_model_card(language="en", license="apache-2.0", tags="synthetic")
    output_dir = trainer.args.output_dir
    card = ModelCard.load(os.path.join(output_dir, "README.md"))
    check_hf_align_card(card, output_dir, metrics)
    assert (card.data.language, card.data.license) == ("en", "apache-2.0")
    assert "synthetic" in card.data.tags
    # exactly the card the model renders itself, plus the two header fields
    expected = model.model_card_data.generate_model_card(output_dir, ["synthetic"])
    expected.data.language, expected.data.license = "en", "apache-2.0"
    assert str(card) == str(expected)

    # a plain Trainer writes transformers' generic card over it: what AlignerTrainer exists to avoid
    Trainer(model=model, args=training_args(tmp_path, eval_strategy="no"), train_dataset=views[0]).create_model_card()
    generic = ModelCard.load(os.path.join(output_dir, "README.md"))
    assert generic.data.base_model is None and "More information needed" in generic.text


def test_aligner_trainer_push_to_hub_uploads_the_hf_align_card(views, cache, tmp_path, stand_in_hub):
    trainer, metrics = trained_aligner_trainer(
        views, cache, tmp_path, hub_model_id="me/trainer-aligner", hub_token="hf_standin"
    )
    info = trainer.push_to_hub(model_name="ignored when a Hub repo is set")
    assert info.commit_url.startswith(f"{stand_in_hub.url}/me/trainer-aligner/commit/")
    files = stand_in_hub.files("me/trainer-aligner")
    card = ModelCard(files["README.md"].decode())
    check_hf_align_card(card, "me/trainer-aligner", metrics)
    model = trainer.model
    assert str(card) == str(model.model_card_data.generate_model_card("me/trainer-aligner"))
    # the rest of the upload is the saved aligner: its config and exactly its aligner weights
    assert json.loads(files["config.json"])["model_type"] == "hf_align"
    weights = load_safetensors(files["model.safetensors"])
    assert weights.keys() == model.aligner_state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.aligner_state_dict().items())
    posts = [path for method, path, _ in stand_in_hub.requests if method == "POST"]
    assert posts[0] == "/api/repos/create" and posts[-1] == "/api/models/me/trainer-aligner/commit/main"


def test_aligner_trainer_refuses_generic_card_arguments(views, tmp_path, stand_in_hub):
    trainer = AlignerTrainer(
        model=hub_aligner(),
        args=training_args(tmp_path, eval_strategy="no", hub_model_id="me/refused", hub_token="hf_standin"),
        train_dataset=views[0],
        data_collator=hf_align.FeatureCollator(),
    )
    with pytest.raises(
        ValueError,
        match=r"AlignerTrainer writes hf_align's model card, which has no finetuned_from \(got 'bert-base'\): the "
        r"card's base_model is the two encoders",
    ):
        trainer.create_model_card(finetuned_from="bert-base")
    assert not os.path.exists(os.path.join(trainer.args.output_dir, "README.md"))
    with pytest.raises(ValueError, match=r"no dataset \(got 'coco'\): record training data with "):
        trainer.push_to_hub(dataset="coco")
    assert stand_in_hub.requests == []  # refused before creating the repo or saving anything
    assert not os.path.exists(os.path.join(trainer.args.output_dir, "config.json"))


def test_aligner_trainer_keeps_a_given_callback_and_needs_an_aligner(views, tmp_path):
    callback = CardDataCallback(init_samples=7)
    trainer = AlignerTrainer(
        model=hub_aligner(),
        args=training_args(tmp_path, eval_strategy="no"),
        train_dataset=views[0],
        callbacks=[callback],
    )
    assert [c for c in trainer.callback_handler.callbacks if isinstance(c, CardDataCallback)] == [callback]
    with pytest.raises(TypeError, match="AlignerTrainer works with hf_align.AlignerModel, got Linear"):
        AlignerTrainer(model=torch.nn.Linear(2, 2), args=training_args(tmp_path, eval_strategy="no"))
