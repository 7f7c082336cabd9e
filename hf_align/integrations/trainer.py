"""`CardDataCallback`: what `transformers.Trainer` needs to train an aligner like `hf_align.train` does.

`Trainer(model=aligner, args=..., train_dataset=hf_align.features_for(aligner, features),
data_collator=hf_align.FeatureCollator(), callbacks=[hf_align.CardDataCallback()])` then trains with no subclassing:

* before the first step, methods with a data-dependent start (anchors, codebooks) get `init_from_data` on up to
  `init_samples` training pairs, as `hf_align.train` gives them (skipped when resuming: the checkpoint holds them);
* after every optimiser step, `aligner.after_optimizer_step()` runs (EMA teachers, codebook updates);
* the run is recorded on the model's card data (`model.model_card_data`, kept in `config.training_summary`) as
  `hf_align.train` records it (pairs, steps, runtime, hardware, mixed precision, non-default arguments, last
  validation metrics) plus the loss log, so `save_pretrained` / `push_to_hub` write a model card describing this run.

Evaluation loss needs nothing extra: `FeatureCollator` puts `return_loss=True` in every batch, which
`Trainer.prediction_step` reads before its `can_return_loss` default.

`AlignerTrainer` is that `Trainer` with the callback built in and hf_align's model card: `Trainer.create_model_card`
(which `Trainer.push_to_hub` calls between saving the model and uploading `output_dir`) writes transformers' generic
card over the one `save_pretrained` wrote, and no callback event comes after it, so only a subclass can keep the
card. `AlignerTrainer.create_model_card` writes `model.model_card_data.generate_model_card(...)` instead: both
encoders as `base_model` (their pinned revisions in the body), the method, the training record and the
`model-index`.
"""

from __future__ import annotations

import os
import time

import datasets
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

# TrainingArguments that say where things go, not how the model was trained: left out of the card.
_IGNORED_ARGUMENTS = frozenset(
    {
        "output_dir",
        "logging_dir",
        "run_name",
        "report_to",
        "hub_token",
        "hub_model_id",
        "push_to_hub",
        "disable_tqdm",
        "logging_steps",
        "logging_strategy",
        "logging_first_step",
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "overwrite_output_dir",
        "use_cpu",
        "dataloader_num_workers",
        "local_rank",
        "do_train",
        "do_eval",
        "do_predict",  # derived from the strategies
    }
)


class CardDataCallback(TrainerCallback):
    """Trainer callback for `AlignerModel`: data-dependent init, `after_optimizer_step`, and the card's training record.

    Args:
        init_samples: training pairs shown to the aligner's `init_from_data` before the first step (as
            `AlignmentArguments.init_samples`).
    """

    def __init__(self, init_samples: int = 10000):
        if not isinstance(init_samples, int) or isinstance(init_samples, bool) or init_samples < 1:
            raise ValueError(f"init_samples must be a positive int, got {init_samples!r}")
        self.init_samples = init_samples
        self._start = None
        self._logs: list[dict] = []
        self._last_eval: dict = {}
        self._train_pairs = None
        self._eval_pairs = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        aligner_model = _aligner_model(model)
        dataset = getattr(train_dataloader, "dataset", None)
        self._train_pairs = len(dataset) if isinstance(dataset, datasets.Dataset) else None
        if state.global_step == 0:
            self._logs, self._last_eval = [], {}
            if _initialises_from_data(aligner_model):
                if not isinstance(dataset, datasets.Dataset):
                    raise ValueError(
                        f"method {aligner_model.config.method!r} initialises from data, but the Trainer's training "
                        f"set is a {type(dataset).__name__}, not a datasets.Dataset view "
                        "(hf_align.features_for(model, features))"
                    )
                _init_from_data(aligner_model, dataset, self.init_samples, args.seed)
        if state.max_steps > 0:  # STRUCTURE's warmup_steps="auto" is a share of the run
            from ..training.loop import schedule_regularizers

            schedule_regularizers(aligner_model, state.max_steps * args.gradient_accumulation_steps)
        # What was recorded before this run (an earlier fit, evaluations of the old weights) no longer describes it.
        aligner_model.model_card_data.start_training_run()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        _aligner_model(model).aligner.after_optimizer_step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._row(state)["training_loss"] = float(logs["loss"])

    def on_evaluate(self, args, state, control, metrics=None, model=None, eval_dataloader=None, **kwargs):
        if not metrics:
            return
        dataset = getattr(eval_dataloader, "dataset", None)
        if isinstance(dataset, datasets.Dataset):
            self._eval_pairs = len(dataset)
        self._last_eval = {k: float(v) for k, v in metrics.items() if k.startswith("eval_") and _is_metric(k)}
        if "eval_loss" in metrics:
            self._row(state)["validation_loss"] = float(metrics["eval_loss"])

    def on_train_end(self, args, state, control, model=None, **kwargs):
        _aligner_model(model).model_card_data.set_training_run(
            trainer="transformers.Trainer",
            train_pairs=self._train_pairs,
            eval_pairs=self._eval_pairs or 0,
            global_step=state.global_step,
            best_step=state.best_global_step,
            runtime_s=time.perf_counter() - self._start,
            device=args.device,
            mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else "no",
            training_args=non_default_training_args(args),
            final_eval=self._last_eval,
            training_logs=self._logs,
        )

    def _row(self, state) -> dict:
        if not self._logs or self._logs[-1]["step"] != state.global_step:
            self._logs.append({"epoch": round(float(state.epoch or 0.0), 4), "step": state.global_step})
        return self._logs[-1]


class AlignerTrainer(Trainer):
    """`transformers.Trainer` for an `AlignerModel`: a `CardDataCallback` and hf_align's model card built in.

    Takes `Trainer`'s arguments. Unless `callbacks` already holds a `CardDataCallback` (to choose its
    `init_samples`), a default one is added. `create_model_card()` and so `push_to_hub()` write the aligner's own card
    (`model.model_card_data.generate_model_card`) to `output_dir/README.md`, not transformers' generic one.

    ```python
    trainer = hf_align.AlignerTrainer(
        model=aligner, args=TrainingArguments("out", hub_model_id="me/aligner"),
        train_dataset=hf_align.features_for(aligner, features), data_collator=hf_align.FeatureCollator(),
    )
    trainer.train()
    trainer.push_to_hub()  # config, aligner weights and hf_align's model card
    ```
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _aligner_model(self.model, "AlignerTrainer")
        if not any(isinstance(callback, CardDataCallback) for callback in self.callback_handler.callbacks):
            self.add_callback(CardDataCallback())

    def create_model_card(
        self,
        language: str | list[str] | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write hf_align's card of the trained aligner to `output_dir/README.md` (on the main process only).

        Args:
            language: added to the card's YAML header.
            license: added to the card's YAML header.
            tags: added to the card's tags (`Trainer.push_to_hub` passes the model's `model_tags` here).
            model_name: what the card's title and usage snippet name when the Trainer has no Hub repo
                (`hub_model_id`, set by `push_to_hub`, wins; default: `output_dir`).

        `Trainer.create_model_card`'s other arguments (`finetuned_from`, `tasks`, `dataset`, `dataset_tags`,
        `dataset_args`) have no counterpart here and raise a `ValueError` saying what describes them instead.
        """
        _refuse_generic_card_arguments(
            {
                "finetuned_from": finetuned_from,
                "tasks": tasks,
                "dataset_tags": dataset_tags,
                "dataset": dataset,
                "dataset_args": dataset_args,
            }
        )
        if not self.is_world_process_zero():
            return
        model = _aligner_model(self.accelerator.unwrap_model(self.model), "AlignerTrainer")
        card = model.model_card_data.generate_model_card(
            self.hub_model_id or model_name or self.args.output_dir, [tags] if isinstance(tags, str) else tags or ()
        )
        if language is not None:
            card.data.language = language
        if license is not None:
            card.data.license = license
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def push_to_hub(self, *args, **kwargs):
        """`Trainer.push_to_hub`, with the card arguments checked before anything is saved or uploaded."""
        _refuse_generic_card_arguments({k: v for k, v in kwargs.items() if k in _GENERIC_CARD_ARGUMENTS})
        return super().push_to_hub(*args, **kwargs)


# Trainer.create_model_card's arguments that hf_align's card takes from the model instead: what to do about each.
_GENERIC_CARD_ARGUMENTS = {
    "finetuned_from": "the card's base_model is the two encoders (and revisions) the aligner's config records",
    "tasks": "the card's pipeline tag is zero-shot-image-classification",
    "dataset": "record training data with model.model_card_data.add_training_dataset(...) before saving",
    "dataset_tags": "record training data with model.model_card_data.add_training_dataset(...) before saving",
    "dataset_args": "record training data with model.model_card_data.add_training_dataset(...) before saving",
}


def _refuse_generic_card_arguments(arguments: dict) -> None:
    for name, value in arguments.items():
        if value is not None:
            raise ValueError(
                f"AlignerTrainer writes hf_align's model card, which has no {name} (got {value!r}): "
                f"{_GENERIC_CARD_ARGUMENTS[name]}"
            )


def non_default_training_args(args: TrainingArguments) -> dict:
    """The `TrainingArguments` that differ from their defaults, leaving out paths, logging and hub settings."""
    defaults = TrainingArguments(output_dir=args.output_dir, use_cpu=args.use_cpu).to_dict()
    return {
        k: v
        for k, v in args.to_dict().items()
        if k not in _IGNORED_ARGUMENTS and not k.startswith("_") and k in defaults and v != defaults[k]
    }


def _aligner_model(model, user: str = "CardDataCallback"):
    """The `AlignerModel` inside what Trainer hands callbacks (it may be wrapped, e.g. by DDP)."""
    inner = getattr(model, "module", model)
    if not hasattr(inner, "aligner") or not hasattr(inner.config, "training_summary"):
        raise TypeError(f"{user} works with hf_align.AlignerModel, got {type(inner).__name__}")
    return inner


def _initialises_from_data(model) -> bool:
    from ..methods.base import AlignerMethod

    return type(model.aligner).init_from_data is not AlignerMethod.init_from_data


@torch.no_grad()
def _init_from_data(model, dataset: datasets.Dataset, init_samples: int, seed: int) -> None:
    """`hf_align.train`'s data-dependent start, on rows of the Trainer's training set."""
    from ..training.batches import BatchSource, CaptionSampler
    from ..training.loop import AlignmentArguments, init_from_training_rows

    settings = AlignmentArguments(seed=seed, init_samples=init_samples)
    source = BatchSource(dataset)
    sampler = CaptionSampler(torch.arange(len(dataset)), source.image_ids, settings.caption_sampling, seed)
    init_from_training_rows(model, source, sampler, settings, model.logit_scale.device)


def _is_metric(key: str) -> bool:
    # Trainer adds timing entries to the metrics; the card lists model quality only.
    return not key.endswith(("_runtime", "_samples_per_second", "_steps_per_second")) and key != "epoch"


__all__ = ["AlignerTrainer", "CardDataCallback", "non_default_training_args"]
