"""`evaluate` modules shipped inside the package, loadable with no network.

`evaluate.load("accuracy")` fetches its script from the Hub; these modules are plain files inside `hf_align`, so
`hf_align.evaluation.metrics.load("retrieval_recall")` (or
`evaluate.load(hf_align.evaluation.metrics.module_path("retrieval_recall"))`)
works offline. Each module wraps the library's own metric function, so a number computed through `evaluate` and a
number returned by `hf_align.evaluate_retrieval` / `evaluate_zero_shot` / `evaluate_segmentation` (and recorded on
the model card from that result) come from the same code.
"""

from __future__ import annotations

import os

METRIC_NAMES = ("retrieval_recall", "segmentation_miou", "zero_shot_accuracy")

CLIP_CITATION = """
@inproceedings{radford2021clip,
  title={Learning Transferable Visual Models From Natural Language Supervision},
  author={Radford, Alec and Kim, Jong Wook and Hallacy, Chris and others},
  booktitle={ICML},
  year={2021}
}
"""


def module_path(name: str) -> str:
    """Path of the shipped `evaluate` script `name` (one of `METRIC_NAMES`)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown hf_align metric {name!r}; shipped metrics: {list(METRIC_NAMES)}")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name, f"{name}.py")


def metric_info(description: str, inputs_description: str, features, citation: str = CLIP_CITATION, urls=()):
    """The `evaluate.MetricInfo` every shipped module returns from `_info` (`features`: a `datasets.Features`)."""
    import evaluate

    return evaluate.MetricInfo(
        module_type="metric",
        description=description,
        citation=citation,
        inputs_description=inputs_description,
        features=features,
        reference_urls=list(urls),
    )


def load(name: str, **kwargs):
    """`evaluate.load` of a shipped metric by name, offline; `kwargs` go to `evaluate.load` (e.g. `experiment_id`)."""
    import evaluate

    return evaluate.load(module_path(name), **kwargs)


__all__ = ["CLIP_CITATION", "METRIC_NAMES", "load", "metric_info", "module_path"]
