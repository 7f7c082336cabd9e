"""Image↔text retrieval recall@k as an `evaluate` module (one import per line: evaluate scans this file's imports)."""

import datasets
import evaluate
import torch

from hf_align.evaluation.metrics import metric_info
from hf_align.evaluation.zero_shot_retrieval import retrieval_metrics

_DESCRIPTION = """
Recall@k of cross-modal retrieval in both directions, in percent, for any number of captions per image.
A text→image query hits at k when its image ranks in the top k images; an image→text query hits when any of its
captions ranks in the top k texts. Negatives tied with the best positive rank above it (ties count against the
query, so a collapsed model that scores everything alike gets no credit). Returns `image_to_text_R@k`,
`text_to_image_R@k` and their mean `mean_R@k` for each k. This is
`hf_align.evaluation.retrieval_metrics`, the function `hf_align.evaluate_retrieval` uses.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one row per image, its scores against every text: the model's own
        `(n_images, n_texts)` `logits_per_image` (`model(...)`, or `model.similarity.score_unit_norm(image_embeds,
        text_embeds)`), which rank pairs by its similarity head as `hf_align.evaluate_retrieval` does; a raw dot
        product of the embeddings ranks differently under any head other than `cosine` / `dot`.
    references (`list` of `list` of `int`): for each image, the indices (columns of `predictions`) of the texts that
        describe it. Every text belongs to exactly one image; an image may have several texts, or none.
    ks (`list` of `int`, defaults to `[1, 5, 10]`): the cut-offs k.
Returns:
    `dict`: `image_to_text_R@k`, `text_to_image_R@k`, `mean_R@k` (percent) for each k.
Examples:
    >>> import hf_align.evaluation.metrics
    >>> recall = hf_align.evaluation.metrics.load("retrieval_recall")
    >>> recall.compute(predictions=[[0.9, 0.1], [0.8, 0.2]], references=[[0], [1]], ks=[1])
    {'image_to_text_R@1': 50.0, 'text_to_image_R@1': 100.0, 'mean_R@1': 75.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    def _info(self):
        features = {
            "predictions": datasets.Sequence(datasets.Value("float32")),
            "references": datasets.Sequence(datasets.Value("int64")),
        }
        clip_paper = "https://arxiv.org/abs/2103.00020"
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, datasets.Features(features), urls=[clip_paper])

    def _compute(self, predictions, references, ks=(1, 5, 10)):
        lengths = sorted({len(row) for row in predictions})
        if len(lengths) != 1:
            raise ValueError(
                "predictions must be one row of scores per image, all rows as long as the number of texts; "
                f"got rows of lengths {lengths}"
            )
        scores = torch.tensor(predictions, dtype=torch.float32)
        return retrieval_metrics(scores, text_owners(references, scores.shape[1]), ks)


def text_owners(references, n_texts: int) -> torch.Tensor:
    """Per-image lists of text indices -> (n_texts,) index of the image each text describes."""
    owner = torch.full((n_texts,), -1, dtype=torch.long)
    for image, texts in enumerate(references):
        for text in texts:
            if not 0 <= text < n_texts:
                raise ValueError(f"references[{image}] names text {text}, outside [0, {n_texts}) (the score columns)")
            if owner[text] >= 0:
                raise ValueError(
                    f"text {text} is listed under images {int(owner[text])} and {image}; each text describes one image"
                )
            owner[text] = image
    orphans = torch.nonzero(owner < 0).flatten().tolist()
    if orphans:
        raise ValueError(f"texts {orphans[:10]} are listed under no image in references; every text needs its image")
    return owner
