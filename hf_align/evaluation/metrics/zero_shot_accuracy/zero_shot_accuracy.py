"""Zero-shot classification top-k accuracy and mean per-class recall as an `evaluate` module (one import per line:
evaluate scans this file's imports)."""

import datasets
import evaluate
import torch

from hf_align.evaluation.metrics import metric_info
from hf_align.evaluation.zero_shot_retrieval import zero_shot_metrics

_DESCRIPTION = """
Top-k accuracy and mean per-class recall (balanced accuracy of the top-1 prediction), in percent, of class scores
against integer labels. Classes absent from the references do not enter the per-class mean. This is
`hf_align.evaluation.zero_shot_metrics`, the function `hf_align.evaluate_zero_shot` uses.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one row per image, its score for every class (n, C): the model's
        own logits against the class prompts (`model(...).logits_per_image`, or
        `model.similarity.score_unit_norm(image_embeds, class_prototypes)`), which rank classes by its similarity head
        as `hf_align.evaluate_zero_shot` does; a raw dot product ranks differently under any head other than
        `cosine` / `dot`.
    references (`list` of `int`): the true class of each image, in [0, C).
    ks (`list` of `int`, defaults to `[1, 5]`): the cut-offs k of top-k accuracy (k above C counts as C).
Returns:
    `dict`: `top{k}` for each k and `mean_per_class_recall` (percent).
Examples:
    >>> import hf_align.evaluation.metrics
    >>> accuracy = hf_align.evaluation.metrics.load("zero_shot_accuracy")
    >>> accuracy.compute(predictions=[[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]], references=[0, 1, 1], ks=[1])
    {'top1': 66.66666865348816, 'mean_per_class_recall': 75.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ZeroShotAccuracy(evaluate.Metric):
    def _info(self):
        features = {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
        clip_paper = "https://arxiv.org/abs/2103.00020"
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, datasets.Features(features), urls=[clip_paper])

    def _compute(self, predictions, references, ks=(1, 5)):
        lengths = sorted({len(row) for row in predictions})
        if len(lengths) != 1:
            raise ValueError(
                f"predictions must give every image a score for each of the C classes; got rows of lengths {lengths}"
            )
        return zero_shot_metrics(torch.tensor(predictions, dtype=torch.float32), references, ks)
