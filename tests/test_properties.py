"""Property-based tests: configs reject invalid values and round-trip valid ones; metrics match brute-force
definitions and keep their invariants; InfoNCE stays finite."""

import dataclasses
import math
import typing

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_align import AlignerConfig, AlignerModel
from hf_align.evaluation import retrieval_metrics, zero_shot_metrics
from hf_align.functional import symmetric_infonce
from hf_align.methods import METHODS
from hf_align.regularizers import REGULARIZERS
from hf_align.training import AlignmentArguments

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Values that are wrong for a field of each kind (a bool is not an int; floats must be finite).
WRONG = {
    int: [True, 1.5, "8", None, [8]],
    float: [float("nan"), float("inf"), "0.1", None, True],
    bool: ["yes", 1, None, "False"],
    str: [3, None, b"name"],
}


# ---------------------------------------------------------------------------------------------- AlignmentArguments
POSITIVE_INTS = [
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "logging_steps",
    "save_total_limit",
    "init_samples",
]
# None: chosen from the data (batch, evaluation interval) or at evaluations (save_steps)
OPTIONAL_POSITIVE_INTS = ["per_device_train_batch_size", "eval_steps", "save_steps"]

valid_arguments = st.fixed_dictionaries(
    {
        **{name: st.integers(1, 10_000) for name in POSITIVE_INTS},
        **{name: st.none() | st.integers(1, 10_000) for name in OPTIONAL_POSITIVE_INTS},
        "early_stopping_patience": st.none() | st.integers(0, 10_000),  # None: automatic, 0: never stop early
        "max_steps": st.integers(-5, 10_000),
        "num_train_epochs": st.none() | st.floats(0.01, 1e3),  # None: automatic length
        "learning_rate": st.floats(1e-8, 10.0),
        "weight_decay": st.floats(0.0, 1.0),
        "max_grad_norm": st.floats(0.0, 100.0),
        "warmup_ratio": st.floats(0.0, 1.0),
        "warmup_steps": st.integers(0, 1000),
        "eval_fraction": st.floats(0.0, 0.99),
        "lr_scheduler_type": st.sampled_from(["linear", "cosine", "constant", "constant_with_warmup"]),
        "mixed_precision": st.sampled_from(["no", "bf16", "fp16", "auto"]),
        "metric_for_best_model": st.sampled_from(["eval_loss", "eval_mean_R@1", "eval_text_to_image_R@5"]),
        "seed": st.integers(0, 2**31),
    }
)


@FAST
@given(valid_arguments)
def test_valid_training_arguments_are_accepted_and_round_trip(values):
    args = AlignmentArguments(**values)
    assert AlignmentArguments(**dataclasses.asdict(args)) == args
    for name, value in values.items():
        assert getattr(args, name) == value


invalid_argument = st.one_of(
    st.tuples(st.sampled_from(POSITIVE_INTS), st.sampled_from([0, -1, -100, *WRONG[int]])),
    st.tuples(st.sampled_from(OPTIONAL_POSITIVE_INTS), st.sampled_from([0, -3, True, 2.5, "4"])),
    st.tuples(st.just("early_stopping_patience"), st.sampled_from([-3, True, 2.5, "4"])),
    st.tuples(st.sampled_from(["max_steps", "warmup_steps", "seed"]), st.sampled_from([1.5, "3", None, True])),
    st.tuples(st.just("warmup_steps"), st.integers(-1000, -1)),
    st.tuples(st.just("learning_rate"), st.sampled_from([0.0, -1e-3, *WRONG[float]])),
    st.tuples(st.sampled_from(["weight_decay", "max_grad_norm"]), st.sampled_from([-0.1, *WRONG[float]])),
    st.tuples(st.just("warmup_ratio"), st.sampled_from([-0.1, 1.5, *WRONG[float]])),
    st.tuples(st.just("eval_fraction"), st.sampled_from([1.0, -0.1, 2.0, *WRONG[float]])),
    st.tuples(st.just("num_train_epochs"), st.sampled_from([v for v in WRONG[float] if v is not None])),
    st.tuples(st.just("lr_scheduler_type"), st.sampled_from(["cosine_annealing", "", 3, None])),
    st.tuples(st.just("mixed_precision"), st.sampled_from(["fp8", "bfloat16", None, 16])),
    st.tuples(st.just("metric_for_best_model"), st.sampled_from(["loss", "R@1", None, 3])),
)


@FAST
@given(invalid_argument)
def test_invalid_training_arguments_are_rejected_by_name(case):
    name, value = case
    with pytest.raises((ValueError, TypeError), match=name):
        AlignmentArguments(**{name: value})


def test_training_without_any_length_is_rejected():
    with pytest.raises(ValueError, match=r"give num_train_epochs > 0, max_steps > 0 or neither \(automatic length\)"):
        AlignmentArguments(num_train_epochs=0.0, max_steps=-1)


# ---------------------------------------------------------------------------------------------- AlignerConfig
valid_config = st.fixed_dictionaries(
    {
        "vision_encoder": st.none() | st.text(min_size=1, max_size=30),
        "text_encoder": st.none() | st.text(min_size=1, max_size=30),
        "vision_revision": st.none() | st.text(alphabet="0123456789abcdef", min_size=7, max_size=40),
        "vision_layer": st.sampled_from(["auto"]) | st.integers(-50, 50),
        "text_layer": st.sampled_from(["auto"]) | st.integers(-50, 50),
        "vision_pooling": st.sampled_from(["auto", "cls", "mean", "tokens"]),
        "text_pooling": st.sampled_from(["auto", "cls", "mean", "tokens"]),
        "vision_hidden_size": st.none() | st.integers(1, 8192),
        "text_hidden_size": st.none() | st.integers(1, 8192),
        "vision_num_layers": st.none() | st.integers(1, 100),
        "vision_has_cls": st.booleans(),
        "method": st.sampled_from(sorted(METHODS)),
        "method_config": st.dictionaries(st.sampled_from(["projection_dim", "num_anchors"]), st.integers(1, 64)),
        "contrastive_temperature": st.floats(1e-6, 1e6),
        "learnable_temperature": st.booleans(),
        "bundled_encoders": st.booleans(),
        "regularizers": st.sampled_from([{}, {"structure": {"weight": 1.0, "levels": 2}}]),
        "training_summary": st.dictionaries(st.sampled_from(["train_pairs", "global_step"]), st.integers(0, 10**6)),
    }
)


@FAST
@given(valid_config)
def test_valid_aligner_configs_round_trip_through_dicts(values):
    config = AlignerConfig(**values)
    again = AlignerConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    for name, value in values.items():
        assert getattr(again, name) == value, name


invalid_config = st.one_of(
    st.tuples(
        st.sampled_from(["vision_hidden_size", "text_hidden_size", "vision_num_layers", "text_num_layers"]),
        st.sampled_from([0, -4, True, 32.0, "32"]),
    ),
    st.tuples(st.sampled_from(["vision_layer", "text_layer"]), st.sampled_from([1.5, "last", None, True])),
    st.tuples(st.sampled_from(["vision_pooling", "text_pooling"]), st.sampled_from(["maximum", "CLS", None, 1])),
    st.tuples(
        st.just("contrastive_temperature"), st.sampled_from([0.0, -0.05, float("nan"), float("inf"), True, "0.05"])
    ),
    st.tuples(
        st.sampled_from(["vision_has_cls", "learnable_temperature", "bundled_encoders"]), st.sampled_from(WRONG[bool])
    ),
    st.tuples(st.sampled_from(["method", "similarity"]), st.sampled_from(["", 3, None])),
    st.tuples(
        st.sampled_from(["method_config", "similarity_config", "regularizers", "training_summary"]),
        st.sampled_from([[1], "x", 3]),
    ),
    st.tuples(st.just("regularizers"), st.just({"structure": 10.0})),
    st.tuples(st.sampled_from(["vision_encoder", "text_revision"]), st.sampled_from([3, ["a"], b"id"])),
)


@FAST
@given(invalid_config)
def test_invalid_aligner_config_values_are_rejected_by_name(case):
    name, value = case
    with pytest.raises(ValueError, match=name):
        AlignerConfig(**{name: value})


# ---------------------------------------------------------------------------------------------- method settings
def _settings_classes():
    methods = [(name, cls.config_class, "") for name, cls in sorted(METHODS.items())]
    regularizers = [(name, cls.config_class, f"{name}_") for name, cls in sorted(REGULARIZERS.items())]
    return methods + regularizers


def _typed_fields(config_class):
    hints = typing.get_type_hints(config_class)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(config_class) if hints[f.name] in WRONG]


@pytest.mark.parametrize(
    "owner, config_class, prefix", _settings_classes(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_method_and_regularizer_setting_round_trips_and_rejects_wrong_types(owner, config_class, prefix):
    default = config_class()
    assert config_class.from_kwargs(owner, default.to_dict()) == default  # to_dict / from_kwargs round trip
    with pytest.raises(TypeError, match=rf"{owner!r} got unknown argument\(s\) \['no_such_setting'\]"):
        config_class.from_kwargs(owner, {"no_such_setting": 1})
    method = owner if not prefix else "linear"
    for field, kind in _typed_fields(config_class):
        for wrong in WRONG[kind]:
            with pytest.raises((ValueError, TypeError), match=field):
                AlignerModel.from_feature_dims(8, 8, method=method, **{prefix + field: wrong})


# ---------------------------------------------------------------------------------------------- metrics
def brute_retrieval(scores: np.ndarray, owner: np.ndarray, k: int) -> tuple[float, float]:
    n_images, n_texts = scores.shape
    # rank = negatives scoring at least as high as the best positive (ties count against the query)
    t2i = [
        sum(scores[j, t] >= scores[owner[t], t] for j in range(n_images) if j != owner[t]) < k for t in range(n_texts)
    ]
    i2t = []
    for i in range(n_images):
        mine = [t for t in range(n_texts) if owner[t] == i]
        if mine:
            best = max(scores[i, t] for t in mine)
            i2t.append(sum(scores[i, t] >= best for t in range(n_texts) if owner[t] != i) < k)
    return 100.0 * np.mean(i2t), 100.0 * np.mean(t2i)


@st.composite
def retrieval_problem(draw):
    n_images = draw(st.integers(1, 7))
    owner = draw(st.lists(st.integers(0, n_images - 1), min_size=1, max_size=12))
    values = st.floats(-5, 5, allow_nan=False) | st.sampled_from([0.0, 1.0])  # ties included
    scores = draw(
        st.lists(st.lists(values, min_size=len(owner), max_size=len(owner)), min_size=n_images, max_size=n_images)
    )
    return np.array(scores, dtype=np.float32), np.array(owner)


@FAST
@given(retrieval_problem(), st.lists(st.integers(1, 10), min_size=1, max_size=3, unique=True))
def test_retrieval_recall_matches_its_definition_and_invariants(problem, ks):
    scores, owner = problem
    metrics = retrieval_metrics(torch.from_numpy(scores), torch.from_numpy(owner), ks=ks)
    for k in ks:
        i2t, t2i = brute_retrieval(scores, owner, k)
        assert metrics[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert metrics[f"text_to_image_R@{k}"] == pytest.approx(t2i)
        assert metrics[f"mean_R@{k}"] == pytest.approx((i2t + t2i) / 2)
        assert 0.0 <= metrics[f"mean_R@{k}"] <= 100.0
    for small, large in zip(sorted(ks), sorted(ks)[1:]):
        assert metrics[f"text_to_image_R@{small}"] <= metrics[f"text_to_image_R@{large}"]
    n_images, n_texts = scores.shape
    assert retrieval_metrics(torch.from_numpy(scores), torch.from_numpy(owner), ks=(max(n_images, n_texts),)) == {
        f"{name}_R@{max(n_images, n_texts)}": 100.0 for name in ("image_to_text", "text_to_image", "mean")
    }
    # an order-preserving rescaling of the scores (x4 is exact in float) and a relabelling of images and texts
    # change nothing
    image_order, text_order = (
        np.random.default_rng(0).permutation(n_images),
        np.random.default_rng(1).permutation(n_texts),
    )
    rescaled = 4.0 * scores[image_order][:, text_order]
    permuted = retrieval_metrics(
        torch.from_numpy(rescaled), torch.from_numpy(np.argsort(image_order)[owner[text_order]]), ks=ks
    )
    assert permuted == pytest.approx(metrics)


@st.composite
def classification_problem(draw):
    n_classes = draw(st.integers(1, 6))
    labels = draw(st.lists(st.integers(0, n_classes - 1), min_size=1, max_size=15))
    logits = draw(
        st.lists(
            st.lists(st.floats(-3, 3, allow_nan=False), min_size=n_classes, max_size=n_classes),
            min_size=len(labels),
            max_size=len(labels),
        )
    )
    return np.array(logits, dtype=np.float32), np.array(labels)


@FAST
@given(classification_problem())
def test_zero_shot_metrics_match_their_definition(problem):
    logits, labels = problem
    n, n_classes = logits.shape
    metrics = zero_shot_metrics(torch.from_numpy(logits), torch.from_numpy(labels), ks=(1, n_classes))
    predicted = torch.from_numpy(logits).argmax(1).numpy()  # torch's tie-breaking, as the metric uses
    assert metrics["top1"] == pytest.approx(100.0 * np.mean(predicted == labels))
    assert metrics[f"top{n_classes}"] == 100.0
    recalls = [np.mean(predicted[labels == c] == c) for c in range(n_classes) if (labels == c).any()]
    assert metrics["mean_per_class_recall"] == pytest.approx(100.0 * np.mean(recalls))


# ---------------------------------------------------------------------------------------------- InfoNCE
@FAST
@given(
    st.integers(1, 16).flatmap(
        lambda b: st.lists(st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32), min_size=b * b, max_size=b * b)
    )
)
def test_infonce_is_finite_nonnegative_and_symmetric(values):
    b = math.isqrt(len(values))
    logits = torch.tensor(values, dtype=torch.float32).view(b, b)
    loss = symmetric_infonce(logits)
    assert torch.isfinite(loss) and loss.item() >= 0.0
    torch.testing.assert_close(symmetric_infonce(logits.t()), loss)
    order = torch.randperm(b, generator=torch.Generator().manual_seed(b))
    torch.testing.assert_close(symmetric_infonce(logits[order][:, order]), loss)  # relabelling the pairs
    if b == 1:
        assert loss.item() == 0.0


@FAST
@given(st.integers(2, 32), st.floats(1e-4, 1e4))
def test_infonce_of_tied_scores_is_log_batch_size(b, scale):
    loss = symmetric_infonce(torch.full((b, b), scale))
    assert loss.item() == pytest.approx(math.log(b), rel=1e-5)
