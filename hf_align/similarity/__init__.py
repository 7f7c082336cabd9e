"""Similarity heads: how an image embedding and a text embedding are scored (cosine, dot, distances, optimal
transport over token sets, learned heads), registered by name like methods and regularisers."""

from ..utils.deprecation import module_getattr
from .heads import (
    SIMILARITIES,
    BilinearSimilarity,
    ChiSquareSimilarity,
    CosineSimilarity,
    DotProductSimilarity,
    EuclideanSimilarity,
    ManhattanSimilarity,
    MLPSimilarity,
    SimilarityHead,
    build_similarity,
    check_similarity,
    get_similarity,
    pairwise_chunked,
    register_similarity,
)

__all__ = [
    "SIMILARITIES",
    "BilinearSimilarity",
    "ChiSquareSimilarity",
    "CosineSimilarity",
    "DotProductSimilarity",
    "EuclideanSimilarity",
    "MLPSimilarity",
    "ManhattanSimilarity",
    "SimilarityHead",
    "build_similarity",
    "check_similarity",
    "get_similarity",
    "pairwise_chunked",
    "register_similarity",
]

__getattr__ = module_getattr(__name__)
