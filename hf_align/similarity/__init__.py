"""Similarity heads: how an aligned image embedding and an aligned text embedding are scored, registered by name like
methods and regularisers.

A head is chosen by name, like a method (`AlignerModel.from_encoders(..., similarity="bilinear",
similarity_config={...})`, stored in `AlignerConfig.similarity` / `similarity_config`), and the model uses it
everywhere it scores pairs: the training logits (`logits = similarity / τ`), validation, retrieval and zero-shot.

| name | score s(x, y) | parameters |
|---|---|---|
| `cosine` | `x·y / (‖x‖‖y‖)` | — |
| `dot` | `x·y` | — |
| `euclidean` | `−‖x − y‖₂` | — |
| `manhattan` | `−‖x − y‖₁` | — |
| `chi_square` | `−½ Σ_k (x_k − y_k)² / (|x_k| + |y_k|)` (see `ChiSquareSimilarity` for signed inputs) | — |
| `mlp` | `w₂ᵀ GELU(A x + B y + b₁) + b₂` (an MLP on the concatenated pair) | yes |
| `bilinear` | `xᵀ (I + Δ) y`, Δ learned (starts as the dot product) | yes |

The first four distances plus chi-square are the paper's standard metrics and the last two its learned ones (Xu &
Leiva, docs/methods.md §8). The model feeds heads its L2-normalised embeddings, so there `dot` equals `cosine` and
`euclidean` is a monotone function of it (`√(2 − 2 cos)`); they still train differently (gradients and logit ranges
differ), and on unnormalised inputs they are distinct metrics.

Contract of a head (`SimilarityHead`, in `base`):
    * built as `cls(dim, **settings)`, `settings` being the fields of its `config_class` (a `SimilarityConfig`
      dataclass; `AlignerConfig.similarity_config` holds them as a dict). `build_similarity` / `check_similarity`
      check them with `config_class.from_kwargs`: an unknown key is a `TypeError` listing the accepted ones, a value
      of the wrong type or out of range a `ValueError` naming the field.
    * `forward(x, y)`: (Bi, D) and (Bt, D) -> (Bi, Bt) raw scores, higher = more similar; the model divides by τ.
    * `score_pairs(x, y)`: (N, D) and (N, D) -> (N,), the score of row i with row i only (diagnostics).
    * `learned`: whether the head has trainable parameters (they train with the aligner and are saved with it).
    * `inner_product`: whether `score_unit_norm(x, y)` is the plain matrix product `x @ y.T` (`cosine`, `dot`): the
      evaluations then score with that product and keep the protocols' own inputs as they are (segmentation's patch
      embeddings are not renormalised); every other head scores the unit-norm embeddings the model trains it on.

`score_unit_norm` is the scoring entry point: `AlignerModel.forward` turns embeddings into logits with it, and every
evaluation (zero-shot, retrieval, segmentation, `compare`, the benchmark) ranks with it, so a reported figure is what
the model's own logits give.

Every head scores pooled embeddings, one vector per sample: that is what every registered method outputs.

Memory: heads whose pairwise score is not a matrix product (`manhattan`, `chi_square`, `mlp`) build an intermediate of
size Bi·Bt·w per batch (w = D or the MLP's hidden width). They evaluate it in blocks of at most `max_chunk_elements`
numbers and, when gradients are needed, recompute each block in the backward pass (`torch.utils.checkpoint`), so peak
memory is bounded by the block size, not by Bi·Bt·w.

Where they live: the registry and the checks in `registry`, the base class, `SimilarityConfig` and the blockwise
helpers in `base`, the heads in `inner_product` (cosine, dot), `distances` (euclidean, manhattan, chi_square) and
`learned` (mlp, bilinear).

Compatibility: `check_similarity(name, method, similarity_config)` runs when an aligner is configured (before any
encoder is loaded) and rejects a learned head with a training-free method, whose head would never train.
"""

from ..utils.deprecation import module_getattr

# The built-in heads: importing a module runs its @register_similarity. (`as`: re-exported, not unused.)
from . import distances as distances
from . import inner_product as inner_product
from . import learned as learned
from .base import SimilarityConfig, SimilarityHead, pairwise_chunked
from .distances import (
    ChiSquareSimilarity,
    ChiSquareSimilarityConfig,
    EuclideanSimilarity,
    EuclideanSimilarityConfig,
    ManhattanSimilarity,
    ManhattanSimilarityConfig,
)
from .inner_product import CosineSimilarity, CosineSimilarityConfig, DotProductSimilarity, DotProductSimilarityConfig
from .learned import BilinearSimilarity, BilinearSimilarityConfig, MLPSimilarity, MLPSimilarityConfig
from .registry import SIMILARITIES, build_similarity, check_similarity, get_similarity, register_similarity

__all__ = [
    "SIMILARITIES",
    "BilinearSimilarity",
    "BilinearSimilarityConfig",
    "ChiSquareSimilarity",
    "ChiSquareSimilarityConfig",
    "CosineSimilarity",
    "CosineSimilarityConfig",
    "DotProductSimilarity",
    "DotProductSimilarityConfig",
    "EuclideanSimilarity",
    "EuclideanSimilarityConfig",
    "MLPSimilarity",
    "MLPSimilarityConfig",
    "ManhattanSimilarity",
    "ManhattanSimilarityConfig",
    "SimilarityConfig",
    "SimilarityHead",
    "build_similarity",
    "check_similarity",
    "get_similarity",
    "pairwise_chunked",
    "register_similarity",
]

__getattr__ = module_getattr(__name__)
