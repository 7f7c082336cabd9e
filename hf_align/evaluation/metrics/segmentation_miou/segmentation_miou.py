"""Semantic segmentation mean IoU and pixel accuracy as an `evaluate` module (one import per line: evaluate scans
this file's imports)."""

import datasets
import evaluate
import torch

from hf_align.evaluation.metrics import metric_info
from hf_align.evaluation.segmentation import confusion_matrix, segmentation_metrics

_DESCRIPTION = """
Mean intersection-over-union and pixel accuracy, in percent, of predicted label maps against reference label maps,
from one confusion matrix accumulated over the whole dataset. IoU_c = TP / (TP + FP + FN); a class that is neither in
the references nor predicted is skipped (mmseg's convention), and reference pixels equal to `ignore_index` never
count. This is `hf_align.evaluation.segmentation.confusion_matrix` + `segmentation_metrics`, what
`hf_align.evaluate_segmentation` uses.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2-D `list` of `int`): one (H, W) predicted label map per image (sizes may differ between
        images), e.g. `model.segment(...)`, whose patches are scored by the model's similarity head as in
        `hf_align.evaluate_segmentation`.
    references (`list` of 2-D `list` of `int`): the reference label maps, each the size of its prediction.
    num_labels (`int`): number of classes C; labels are in [0, C).
    ignore_index (`int`, defaults to 255): reference label of pixels that are not scored.
    class_names (`list` of `str`, *optional*): names for `per_class_iou` (default: "0", "1", ...).
    num_scored (`int`, *optional*): only the first `num_scored` classes enter the mean (e.g. leave out a
        background prompt that is predicted but never a reference class).
Returns:
    `dict`: `mIoU`, `pixel_accuracy` (percent) and `per_class_iou` (class name -> IoU in percent).
Examples:
    >>> import hf_align.evaluation.metrics
    >>> miou = hf_align.evaluation.metrics.load("segmentation_miou")
    >>> miou.compute(predictions=[[[0, 1], [1, 1]]], references=[[[0, 1], [0, 255]]], num_labels=2)
    {'mIoU': 50.0, 'pixel_accuracy': 66.66666666666666, 'per_class_iou': {'0': 50.0, '1': 50.0}}
"""

_CITATION = """
@inproceedings{everingham2010pascal,
  title={The Pascal Visual Object Classes (VOC) Challenge},
  author={Everingham, Mark and Van Gool, Luc and Williams, Christopher K. I. and Winn, John and Zisserman, Andrew},
  booktitle={IJCV},
  year={2010}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SegmentationMiou(evaluate.Metric):
    def _info(self):
        label_map = datasets.Sequence(datasets.Sequence(datasets.Value("int64")))
        features = datasets.Features({"predictions": label_map, "references": label_map})
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, features, _CITATION, ["https://arxiv.org/abs/2605.16834"])

    def _compute(self, predictions, references, num_labels, ignore_index=255, class_names=None, num_scored=None):
        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive int (the number of classes), got {num_labels!r}")
        confusion = torch.zeros(num_labels, num_labels, dtype=torch.long)
        for index, (prediction, reference) in enumerate(zip(predictions, references)):
            prediction, reference = torch.tensor(prediction), torch.tensor(reference)
            if prediction.shape != reference.shape:
                raise ValueError(
                    f"image {index}: prediction of shape {tuple(prediction.shape)} and reference of shape "
                    f"{tuple(reference.shape)} differ; each reference must be the size of its prediction"
                )
            confusion += confusion_matrix(prediction, reference, num_labels, ignore_index)
        return segmentation_metrics(confusion, class_names, num_scored)
