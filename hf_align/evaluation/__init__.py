"""Evaluation of an aligner through its own similarity head: zero-shot classification, image–text retrieval,
zero-shot segmentation, the CLIP-benchmark suites, and the same metrics as `evaluate` modules (`metrics`)."""

from ..utils.deprecation import module_getattr
from .benchmark import run_benchmark
from .segmentation import evaluate_segmentation
from .zero_shot_retrieval import (
    EvaluationResult,
    evaluate_retrieval,
    evaluate_zero_shot,
    retrieval_metrics,
    zero_shot_metrics,
)

__all__ = [
    "EvaluationResult",
    "evaluate_retrieval",
    "evaluate_segmentation",
    "evaluate_zero_shot",
    "retrieval_metrics",
    "run_benchmark",
    "zero_shot_metrics",
]

__getattr__ = module_getattr(__name__)
