"""Similarity heads: how an aligned image embedding and an aligned text embedding are scored.

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

Contract of a head (`SimilarityHead`):
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

Compatibility: `check_similarity(name, method, similarity_config)` runs when an aligner is configured (before any
encoder is loaded) and rejects a learned head with a training-free method, whose head would never train.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..utils.checks import check_upper_bounds
from ..utils.registry import Registry

SIMILARITIES: Registry[type[nn.Module]] = Registry(
    "similarity", nn.Module, name_attribute="similarity_name", plural="similarities"
)
DEFAULT_MAX_CHUNK_ELEMENTS = 2**25  # 32M numbers = 128 MiB in fp32 per block of a pairwise intermediate


def register_similarity(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a head (an `nn.Module` subclass, normally of `SimilarityHead`) available as
    `similarity=name` (sets its `similarity_name`). A name already taken is a `ValueError` naming both classes."""
    return functools.partial(SIMILARITIES.register, name)


def get_similarity(name: str) -> type[nn.Module]:
    """The head class registered as `name`; `ValueError` listing the registered heads when there is none."""
    return SIMILARITIES.get(name)


def build_similarity(name: str, dim: int, **kwargs) -> nn.Module:
    """Instantiate head `name` for embeddings of width `dim`; `kwargs` come from `AlignerConfig.similarity_config`."""
    cls = get_similarity(name)
    _check_kwargs(name, cls, kwargs)
    return cls(dim, **kwargs)


def _check_kwargs(name: str, cls: type[nn.Module], kwargs: dict[str, Any]) -> None:
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "dim")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"similarity {name!r} got unknown similarity_config key(s) {unknown}; it accepts {accepted or 'none'}"
        )
    check_upper_bounds(f"similarity {name!r}", kwargs)


def check_similarity(name: str, method: Any = None, similarity_config: dict | None = None) -> type[nn.Module]:
    """Validate a head choice at configuration time: the name, its `similarity_config` keys, and that `method` (an
    `AlignerMethod` class or instance, or `None` to skip) can use it: a learned head needs a trainable method (a
    training-free one never runs an optimiser step, so the head would stay untrained). Returns the head class.

    Raises `ValueError` (unknown name, incompatible method) or `TypeError` (unknown config key).
    """
    cls = get_similarity(name)
    _check_kwargs(name, cls, dict(similarity_config or {}))
    if method is None:
        return cls
    if getattr(cls, "learned", False) and not getattr(method, "trainable", True):
        method_name = getattr(method, "method_name", getattr(method, "__name__", type(method).__name__))
        raise ValueError(
            f"similarity {name!r} has trainable parameters, but method {method_name!r} is training-free "
            "(trainable=False: training only runs its data-dependent initialisation), so the head would stay at its "
            "initial weights. Use a fixed similarity (e.g. cosine) with this method, or a trainable method."
        )
    return cls


# ---------------------------------------------------------------------------------------------- base and helpers
class SimilarityHead(nn.Module):
    """Base class of the heads (see the module docstring for the contract)."""

    similarity_name: ClassVar[str] = ""
    learned: ClassVar[bool] = False
    inner_product: ClassVar[bool] = False

    def __init__(self, dim: int):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"similarity dim must be a positive int, got {dim!r}")
        self.dim = dim

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score_unit_norm(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """`forward` on embeddings known to be L2-normalised (the model's): (N, D), (M, D) -> (N, M). Default:
        `forward`; a head that normalises its inputs (`cosine`) skips that here."""
        return self(image_embeds, text_embeds)

    def score_pairs(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Scores of matched rows: (N, D), (N, D) -> (N,). Default: the diagonal of `forward`, in blocks."""
        _check_pairs(image_embeds, text_embeds)
        out = [
            torch.diagonal(self(image_embeds[s : s + 256], text_embeds[s : s + 256]))
            for s in range(0, image_embeds.shape[0], 256)
        ]
        return torch.cat(out)

    def _check(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> None:
        for name, x in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
            if x.dim() != 2 or x.shape[-1] != self.dim:
                raise ValueError(
                    f"similarity {self.similarity_name!r} scores (B, {self.dim}) embeddings; {name} has shape "
                    f"{tuple(x.shape)}"
                )

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Distances subtract nearly equal numbers (‖x‖² + ‖y‖² − 2x·y, x − y): under bf16/fp16 autocast compute them in
    fp32 so matched pairs, whose distance goes to 0, keep a usable gradient."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_pairs(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() < 2:
        raise ValueError(f"score_pairs needs matched rows of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def _needs_grad(*tensors: torch.Tensor, module: nn.Module | None = None) -> bool:
    if not torch.is_grad_enabled():
        return False
    if any(t.requires_grad for t in tensors):
        return True
    return module is not None and any(p.requires_grad for p in module.parameters())


def pairwise_chunked(
    block: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    width: int,
    max_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
    module: nn.Module | None = None,
) -> torch.Tensor:
    """Evaluate `block(x_rows, y_rows) -> (rows_x, rows_y)` over all row pairs in memory-bounded blocks.

    `width` is the number of intermediate values `block` creates per (x row, y row) pair; blocks are sized so that
    rows_x · rows_y · width ≤ `max_elements`. With gradients enabled each block runs under activation checkpointing,
    so the backward pass also holds one block's intermediates at a time (plus the (Bi, Bt) output).
    """
    n_x, n_y = x.shape[0], y.shape[0]
    if n_x * n_y * width <= max_elements:
        return block(x, y)
    cols = n_y if n_y * width <= max_elements else max(1, max_elements // width)
    rows = max(1, max_elements // (cols * width))
    use_checkpoint = _needs_grad(x, y, module=module)
    out_rows = []
    for i in range(0, n_x, rows):
        pieces = []
        for j in range(0, n_y, cols):
            xb, yb = x[i : i + rows], y[j : j + cols]
            pieces.append(checkpoint(block, xb, yb, use_reentrant=False) if use_checkpoint else block(xb, yb))
        out_rows.append(torch.cat(pieces, dim=1))
    return torch.cat(out_rows, dim=0)


# ---------------------------------------------------------------------------------------------- fixed metrics
@register_similarity("cosine")
class CosineSimilarity(SimilarityHead):
    """Cosine similarity `x·y / (‖x‖‖y‖)`, in [−1, 1]. The model's embeddings arrive normalised, so this is their
    dot product; rows are renormalised anyway so the head is a true cosine on any input."""

    inner_product = True

    def forward(self, image_embeds, text_embeds):
        self._check(image_embeds, text_embeds)
        return F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).t()

    def score_unit_norm(self, image_embeds, text_embeds):
        # Unit-norm rows: the cosine is their dot product; renormalising would cost 2 normalisations and their backward.
        self._check(image_embeds, text_embeds)
        return image_embeds @ text_embeds.t()

    def score_pairs(self, image_embeds, text_embeds):
        _check_pairs(image_embeds, text_embeds)
        return F.cosine_similarity(image_embeds, text_embeds, dim=-1)


@register_similarity("dot")
class DotProductSimilarity(SimilarityHead):
    """Dot product `x·y` (no normalisation; equal to `cosine` on the model's unit-norm embeddings)."""

    inner_product = True

    def forward(self, image_embeds, text_embeds):
        self._check(image_embeds, text_embeds)
        return image_embeds @ text_embeds.t()

    def score_pairs(self, image_embeds, text_embeds):
        _check_pairs(image_embeds, text_embeds)
        return (image_embeds * text_embeds).sum(-1)


class _DistanceHead(SimilarityHead):
    """Negative distance, multiplied by `scale` (default 1: the raw metric)."""

    def __init__(self, dim: int, scale: float = 1.0):
        super().__init__(dim)
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.scale = float(scale)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}"


@register_similarity("euclidean")
class EuclideanSimilarity(_DistanceHead):
    """Negative Euclidean distance `−‖x − y‖₂` (in [−2, 0] on unit vectors).

    Computed as `√max(‖x‖² + ‖y‖² − 2 x·y, 1e-12)`: a matrix product, no (Bi, Bt, D) intermediate. The floor keeps
    the gradient finite for identical vectors (it shifts a zero distance to 1e-6).
    """

    def forward(self, image_embeds, text_embeds):
        self._check(image_embeds, text_embeds)
        x, y = _at_least_fp32(image_embeds), _at_least_fp32(text_embeds)
        with torch.autocast(x.device.type, enabled=False):
            squared = (x * x).sum(-1)[:, None] + (y * y).sum(-1)[None, :] - 2.0 * (x @ y.t())
        return -self.scale * squared.clamp_min(1e-12).sqrt()

    def score_pairs(self, image_embeds, text_embeds):
        _check_pairs(image_embeds, text_embeds)
        return -self.scale * ((image_embeds - text_embeds).pow(2).sum(-1).clamp_min(1e-12)).sqrt()


@register_similarity("manhattan")
class ManhattanSimilarity(_DistanceHead):
    """Negative Manhattan (L1) distance `−Σ_k |x_k − y_k|` (up to 2√D on unit vectors, so its logit range grows with
    D; `scale` rescales it). Evaluated in memory-bounded blocks (`max_chunk_elements`)."""

    def __init__(self, dim: int, scale: float = 1.0, max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS):
        super().__init__(dim, scale)
        self.max_chunk_elements = int(max_chunk_elements)

    def forward(self, image_embeds, text_embeds):
        self._check(image_embeds, text_embeds)
        block = lambda x, y: (x[:, None, :] - y[None, :, :]).abs().sum(-1)  # noqa: E731
        x, y = _at_least_fp32(image_embeds), _at_least_fp32(text_embeds)
        return -self.scale * pairwise_chunked(block, x, y, 2 * self.dim, self.max_chunk_elements)

    def score_pairs(self, image_embeds, text_embeds):
        _check_pairs(image_embeds, text_embeds)
        return -self.scale * (image_embeds - text_embeds).abs().sum(-1)


@register_similarity("chi_square")
class ChiSquareSimilarity(_DistanceHead):
    """Negative chi-square distance.

    The chi-square distance `½ Σ_k (x_k − y_k)² / (x_k + y_k)` is defined for non-negative histograms; aligned
    embeddings are signed. Two readings, chosen with `signed`:

    * `"abs"` (default): denominator `|x_k| + |y_k|`, i.e. `½ Σ_k (x_k − y_k)² / (|x_k| + |y_k|)`. It equals the
      classic chi-square distance on non-negative inputs, is symmetric, zero iff x = y, and each term is at most
      `|x_k − y_k|` (reached when the signs differ), so it sits between 0 and the L1 distance. Coordinates where both
      are 0 contribute 0 (the denominator gets `eps`).
    * `"softmax"`: map each embedding to a probability vector `softmax(x / softmax_temperature)` and take the classic
      chi-square between the two distributions (bounded by 1; insensitive to a constant shift of all coordinates).

    Evaluated in memory-bounded blocks (`max_chunk_elements`).
    """

    def __init__(
        self,
        dim: int,
        scale: float = 1.0,
        signed: str = "abs",
        softmax_temperature: float = 0.1,
        eps: float = 1e-8,
        max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
    ):
        super().__init__(dim, scale)
        if signed not in ("abs", "softmax"):
            raise ValueError(f"chi_square signed must be 'abs' or 'softmax', got {signed!r}")
        if softmax_temperature <= 0 or eps <= 0:
            raise ValueError("chi_square softmax_temperature and eps must be > 0")
        self.signed = signed
        self.softmax_temperature = float(softmax_temperature)
        self.eps = float(eps)
        self.max_chunk_elements = int(max_chunk_elements)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x / self.softmax_temperature, dim=-1) if self.signed == "softmax" else x

    def _distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # broadcastable x, y (..., D) -> (...)
        return 0.5 * ((x - y).pow(2) / (x.abs() + y.abs() + self.eps)).sum(-1)

    def forward(self, image_embeds, text_embeds):
        self._check(image_embeds, text_embeds)
        x, y = self._prepare(_at_least_fp32(image_embeds)), self._prepare(_at_least_fp32(text_embeds))
        block = lambda a, b: self._distance(a[:, None, :], b[None, :, :])  # noqa: E731
        return -self.scale * pairwise_chunked(block, x, y, 4 * self.dim, self.max_chunk_elements)

    def score_pairs(self, image_embeds, text_embeds):
        _check_pairs(image_embeds, text_embeds)
        return -self.scale * self._distance(self._prepare(image_embeds), self._prepare(text_embeds))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}, signed={self.signed!r}"


# ---------------------------------------------------------------------------------------------- learned metrics
@register_similarity("mlp")
class MLPSimilarity(SimilarityHead):
    """Learned scorer: an MLP on the concatenated pair, `s(x, y) = w_outᵀ φ(… φ(A x + B y + b₁) …) + b_out`.

    `A x + B y` is the first linear layer applied to `[x; y]`, split so that the (Bi, Bt, hidden_dim) first-layer
    activations are a broadcast sum of two small products. `interaction=True` adds a term `C (x ⊙ y)` to the first
    layer (element-wise products, which an MLP on `[x; y]` can only approximate; it costs Bi·Bt·hidden_dim·D
    multiply-adds). `num_hidden_layers` ≥ 1 hidden layers of width `hidden_dim`, GELU, optional dropout. The output
    layer starts at zero (all pairs score 0, InfoNCE at log B) so the head learns its scale from the data.

    Cost: O(Bi·Bt·hidden_dim) memory per forward, evaluated in blocks of at most `max_chunk_elements` activations and
    recomputed blockwise in the backward pass.
    """

    learned = True

    def __init__(
        self,
        dim: int,
        hidden_dim: int = 256,
        num_hidden_layers: int = 1,
        dropout: float = 0.0,
        interaction: bool = False,
        max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
    ):
        super().__init__(dim)
        if not isinstance(hidden_dim, int) or hidden_dim < 1:
            raise ValueError(f"mlp hidden_dim must be a positive int, got {hidden_dim!r}")
        if not isinstance(num_hidden_layers, int) or num_hidden_layers < 1:
            raise ValueError(f"mlp num_hidden_layers must be an int >= 1, got {num_hidden_layers!r}")
        self.hidden_dim = hidden_dim
        self.interaction = bool(interaction)
        self.max_chunk_elements = int(max_chunk_elements)
        self.image_in = nn.Linear(dim, hidden_dim)
        self.text_in = nn.Linear(dim, hidden_dim, bias=False)
        self.product_in = nn.Linear(dim, hidden_dim, bias=False) if self.interaction else None
        self.hidden = nn.ModuleList(nn.Linear(hidden_dim, hidden_dim) for _ in range(num_hidden_layers - 1))
        self.dropout = nn.Dropout(dropout)
        self.out_weight = nn.Parameter(torch.zeros(hidden_dim))
        self.out_bias = nn.Parameter(torch.zeros(()))

    def reset_parameters(self) -> None:
        # Only the parameters held directly here; the nn.Linear children reset themselves.
        nn.init.zeros_(self.out_weight)
        nn.init.zeros_(self.out_bias)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.dropout(F.gelu(h))
        for layer in self.hidden:
            h = self.dropout(F.gelu(layer(h)))
        return h @ self.out_weight.to(h.dtype) + self.out_bias.to(h.dtype)

    def _block(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.image_in(x)[:, None, :] + self.text_in(y)[None, :, :]  # (bi, bt, H)
        if self.product_in is not None:
            # Σ_d C[h, d] x_d y_d for every pair, as a batched matmul: (bi, H, D) @ (D, bt) -> (bi, H, bt)
            h = h + ((x[:, None, :] * self.product_in.weight[None]) @ y.t()).permute(0, 2, 1)
        return self._head(h)

    def forward(self, image_embeds, text_embeds):
        self._check(image_embeds, text_embeds)
        width = self.hidden_dim * (2 + 2 * len(self.hidden))
        return pairwise_chunked(self._block, image_embeds, text_embeds, width, self.max_chunk_elements, module=self)

    def score_pairs(self, image_embeds, text_embeds):
        _check_pairs(image_embeds, text_embeds)
        h = self.image_in(image_embeds) + self.text_in(text_embeds)
        if self.product_in is not None:
            h = h + self.product_in(image_embeds * text_embeds)
        return self._head(h)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden_dim={self.hidden_dim}, interaction={self.interaction}"


@register_similarity("bilinear")
class BilinearSimilarity(SimilarityHead):
    """Learned bilinear form `s(x, y) = xᵀ W y` with `W = I + Δ`.

    Δ (D×D) starts at zero (`init="identity"`, the head then begins as the dot product = cosine on unit vectors) or
    small random (`init="random"`, std `init_std`). Cost: one extra (Bi, D) × (D, D) product, no pairwise
    intermediate, so it is as cheap as cosine.
    """

    learned = True

    def __init__(self, dim: int, init: str = "identity", init_std: float = 0.02):
        super().__init__(dim)
        if init not in ("identity", "random"):
            raise ValueError(f"bilinear init must be 'identity' or 'random', got {init!r}")
        self.init = init
        self.init_std = float(init_std)
        self.delta = nn.Parameter(torch.zeros(dim, dim))

    def reset_parameters(self) -> None:
        if self.init == "identity":
            nn.init.zeros_(self.delta)
        else:
            nn.init.normal_(self.delta, std=self.init_std)

    @property
    def weight(self) -> torch.Tensor:
        """W = I + Δ, the matrix of the bilinear form."""
        return self.delta + torch.eye(self.dim, dtype=self.delta.dtype, device=self.delta.device)

    def forward(self, image_embeds, text_embeds):
        self._check(image_embeds, text_embeds)
        x = image_embeds + image_embeds @ self.delta.to(image_embeds.dtype)
        return x @ text_embeds.t()

    def score_pairs(self, image_embeds, text_embeds):
        _check_pairs(image_embeds, text_embeds)
        return ((image_embeds + image_embeds @ self.delta.to(image_embeds.dtype)) * text_embeds).sum(-1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, init={self.init!r}"
