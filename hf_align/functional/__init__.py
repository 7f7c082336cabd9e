"""Functions on tensors, with no state and no model: the contrastive loss, STRUCTURE's divergence, Sinkhorn, mutual
k-NN and CKA, relative representations, retrieval ranking and the geometry of two embedding sets (the modality gap).

Methods, regularisers and the evaluation are built from these; they are public so that a user can compute the same
numbers on their own tensors.
"""

from .geometry import alignment_uniformity, gaussian_w2, geometry_report, modality_gap, pair_similarities, sample_w2
from .losses import same_image_mask, symmetric_infonce
from .ot import log_sinkhorn, sinkhorn
from .relative_representations import pick_anchor_pairs, relative_representation
from .representation_similarity import cka, mutual_knn, unbiased_cka
from .retrieval import chunked_retrieval_metrics, topk_similarity
from .structure import structure_regularizer

__all__ = [
    "alignment_uniformity",
    "chunked_retrieval_metrics",
    "cka",
    "gaussian_w2",
    "geometry_report",
    "log_sinkhorn",
    "modality_gap",
    "mutual_knn",
    "pair_similarities",
    "pick_anchor_pairs",
    "relative_representation",
    "same_image_mask",
    "sample_w2",
    "sinkhorn",
    "structure_regularizer",
    "symmetric_infonce",
    "topk_similarity",
    "unbiased_cka",
]
