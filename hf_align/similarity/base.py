"""The contract of a similarity head (`SimilarityHead`, see the package docstring), the settings base its
`config_class` derives from (`SimilarityConfig`), and what the heads share: blockwise pairwise evaluation
(`pairwise_chunked`) and the shape and precision helpers."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..utils.checks import check_upper_bounds
from ..utils.registry import ComponentConfig

DEFAULT_MAX_CHUNK_ELEMENTS = 2**25  # 32M numbers = 128 MiB in fp32 per block of a pairwise intermediate


@dataclass
class SimilarityConfig(ComponentConfig):
    """Base class of a head's settings (`AlignerConfig.similarity_config` holds its fields as a dict).

    Subclasses are dataclasses declaring each field's check with its default (`hf_align.utils.checks`); `from_kwargs`
    (run by `check_similarity` / `build_similarity`) also checks names, types and upper bounds, and names the head as
    `similarity 'mlp'` in its messages."""

    @classmethod
    def owner_label(cls, owner: str) -> str:
        return f"similarity {owner!r}"

    @classmethod
    def check_names(cls, owner: str, kwargs: dict[str, Any]) -> None:
        accepted = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise TypeError(
                f"similarity {owner!r} got unknown similarity_config key(s) {unknown}; it accepts {accepted or 'none'}"
            )

    @classmethod
    def from_settings(cls, owner: str, settings: dict[str, Any]) -> SimilarityConfig:
        """What a head's constructor builds its settings with: names, upper bounds and the declared ranges, not the
        type check of `from_kwargs` (the model runs that once, in `check_similarity`, before it builds the head)."""
        cls.check_names(owner, settings)
        check_upper_bounds(cls.owner_label(owner), settings)
        return cls(**settings)


class SimilarityHead(nn.Module, abc.ABC):
    """Base class of the heads (see the package docstring for the contract).

    A head is built as `cls(dim, **settings)`: `settings` are the fields of its `config_class` (a `SimilarityConfig`
    subclass), checked and kept as `self.config`.
    """

    similarity_name: ClassVar[str] = ""
    config_class: ClassVar[type[SimilarityConfig]] = SimilarityConfig
    learned: ClassVar[bool] = False
    inner_product: ClassVar[bool] = False

    def __init__(self, dim: int, **settings: Any):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"similarity dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.config = self.config_class.from_settings(self.similarity_name or type(self).__name__, settings)

    @abc.abstractmethod
    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Raw scores, higher = more similar: (Bi, D) and (Bt, D) -> (Bi, Bt); the model divides them by τ."""

    def score_unit_norm(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """`forward` on embeddings known to be L2-normalised (the model's): (N, D), (M, D) -> (N, M). Default:
        `forward`; a head that normalises its inputs (`cosine`) skips that here."""
        return self(image_embeds, text_embeds)

    def score_pairs(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Scores of matched rows: (N, D), (N, D) -> (N,). Default: the diagonal of `forward`, in blocks."""
        check_pairs(image_embeds, text_embeds)
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


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Distances subtract nearly equal numbers (‖x‖² + ‖y‖² − 2x·y, x − y): under bf16/fp16 autocast compute them in
    fp32 so matched pairs, whose distance goes to 0, keep a usable gradient."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def check_pairs(x: torch.Tensor, y: torch.Tensor) -> None:
    """`score_pairs` inputs: matched rows, (N, D) and (N, D)."""
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


__all__ = [
    "DEFAULT_MAX_CHUNK_ELEMENTS",
    "SimilarityConfig",
    "SimilarityHead",
    "at_least_fp32",
    "check_pairs",
    "pairwise_chunked",
]
