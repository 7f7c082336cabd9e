"""`asif`: training-free alignment through paired anchors (Norelli et al., "ASIF: coupled data turns unimodal models
to multimodal without training"; `docs/methods.md` §5.1).

Anchors are `num_anchors` training pairs, picked in `init_from_data`. An image is described by its cosine to every
anchor image, a text by its cosine to every anchor caption; both vectors live in the same K-dim space. Each vector
keeps its `topk` largest entries, raised to the power `power`, the rest set to 0; the model L2-normalises it and
scores image–text pairs by cosine. This follows the authors' `relreps.py` (top-k of the cosines, `values ** p`, row
normalisation, dot product), with one deviation: a kept cosine below 0 counts as 0 rather than being raised to an
even power (which would turn a dissimilar anchor into a similar one).

**How sparse.** The authors keep k = 800 of K = 1.6 M anchors (0.05 %). `topk="auto"` (the default) scales k with the
number of anchors, `k = min(800, ⌈√K⌉)`: 64 of 4096, 100 of 10 000, 288 of 82 783 (every COCO-2014 training image),
the authors' 800 from K = 640 000 on. The rule is ours; on the synthetic task (`make_paired_task`, all training pairs
as anchors, p = 8, 1000 held-out pairs, 3 seeds, mean R@1 %) it is within about a point of the best k at every K
measured, while a fixed k = 800 and the authors' fraction k = ⌈K/2000⌉ fall far behind:

| K | ⌈K/2000⌉ | ⌈√K⌉ | 128 | 800 |
|---|---|---|---|---|
| 1 000 | 4.4 (k = 1) | 36.8 (k = 32) | 37.3 | 37.3 |
| 4 000 | 14.5 (k = 2) | 59.1 (k = 64) | 60.1 | 40.7 |
| 10 000 | 27.9 (k = 5) | 73.1 (k = 100) | 73.3 | 54.1 |

**How many anchors.** `num_anchors="auto"` (the default) takes every training pair `init_from_data` is given, up to
`MAX_AUTO_ANCHORS`: more anchors only help (the table above), and a fixed K larger than a small dataset cannot be met.
The count is fixed once the anchors are picked (`config.num_anchors` becomes it); before that an `"auto"` aligner has
no anchors. `hf_align.train` and `AlignerTrainer` (`hf_align.training.init_from_training_rows`) also record the
count in the model's config and size its similarity head for it, so a saved aligner reloads at that width: call
`init_from_training_rows` rather than `aligner.init_from_data` by hand on an `"auto"` aligner. An
explicit K above the pairs given stays an error.

The anchors are buffers, so they are saved with `save_pretrained` and restored by `from_pretrained`; training only
runs `init_from_data`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..functional.relative_representations import pick_anchor_pairs, relative_representation
from ..utils.checks import number, positive_int
from .base import AlignerMethod, MethodConfig
from .citations import ASIF, RELATIVE_REPRESENTATIONS, join
from .registry import register_method

MAX_AUTO_TOPK = 800  # the authors' k, reached by the "auto" rule at their scale
# num_anchors="auto": every training pair up to this many (AlignmentArguments.init_samples' default gives as many)
MAX_AUTO_ANCHORS = 10000


def auto_topk(num_anchors: int) -> int:
    """`topk="auto"`: `min(800, ⌈√K⌉)` entries kept of K anchors (64 of 4096, 288 of 82 783, 800 from 640 000)."""
    return min(MAX_AUTO_TOPK, math.isqrt(num_anchors - 1) + 1)


@dataclass
class ASIFConfig(MethodConfig):
    """num_anchors: K training pairs used as anchors (the embedding width), or `"auto"`: every pair `init_from_data`
    gets, up to `MAX_AUTO_ANCHORS`. topk: entries kept per relative vector, an int or `"auto"` = `min(800, ⌈√K⌉)`
    (the authors keep 800 of 1.6 M). power: exponent applied to the kept similarities (authors' default 8)."""

    check_prefix = "asif: "

    num_anchors: int | str = positive_int("auto", also=("auto",))
    topk: int | str = positive_int("auto", also=("auto",))
    power: float = number(8.0, low=0.0, low_inclusive=False, expected="a number > 0")

    def __post_init__(self):
        super().__post_init__()
        if self.topk != "auto" and self.num_anchors != "auto" and self.topk > self.num_anchors:
            raise ValueError(f"asif: topk={self.topk} must not exceed num_anchors={self.num_anchors}")

    @property
    def resolved_topk(self) -> int:
        """The number of entries kept: `topk`, or the "auto" rule applied to `num_anchors`."""
        return auto_topk(self.num_anchors) if self.topk == "auto" else self.topk


@register_method("asif")
class ASIFAligner(AlignerMethod):
    config_class = ASIFConfig
    trainable = False
    citation = join(ASIF, RELATIVE_REPRESENTATIONS)

    def __init__(self, config: ASIFConfig, vision_dim: int, text_dim: int):
        super().__init__(config, vision_dim, text_dim)
        # "auto": no anchors until init_from_data counts the pairs; the width is then at most MAX_AUTO_ANCHORS.
        rows = 0 if config.num_anchors == "auto" else config.num_anchors
        self.embed_dim = rows or MAX_AUTO_ANCHORS
        self.register_buffer("vision_anchors", torch.zeros(rows, vision_dim))
        self.register_buffer("text_anchors", torch.zeros(rows, text_dim))
        # 1 once init_from_data has run; saved with the anchors so a reloaded model knows it is ready.
        self.register_buffer("anchors_set", torch.zeros((), dtype=torch.uint8))

    @torch.no_grad()
    def init_from_data(self, vision_features, text_features, seed=0, vision_mask=None, text_mask=None) -> None:
        """Use `num_anchors` of the given (N, d) training pairs (drawn with `seed`) as the anchors; with
        `num_anchors="auto"`, min(N, `MAX_AUTO_ANCHORS`) of them, and `config.num_anchors` becomes that count."""
        if self.config.num_anchors == "auto":
            count = min(int(vision_features.shape[0]), MAX_AUTO_ANCHORS)
            if self.config.topk != "auto" and self.config.topk > count:
                raise ValueError(
                    f"asif: topk={self.config.topk} must not exceed num_anchors, which 'auto' makes {count} (the "
                    "training pairs init_from_data got): lower topk or give more pairs"
                )
            self.config.num_anchors = count
            self.embed_dim = count
            self.vision_anchors = self.vision_anchors.new_zeros(count, self.vision_dim)
            self.text_anchors = self.text_anchors.new_zeros(count, self.text_dim)
        self.set_anchors(*pick_anchor_pairs(vision_features, text_features, self.config.num_anchors, seed, "asif"))

    @torch.no_grad()
    def set_anchors(self, vision_anchors: torch.Tensor, text_anchors: torch.Tensor) -> None:
        """Use these (K, d_v) / (K, d_t) paired features as anchors (row k of each is one pair)."""
        expected = ((self.config.num_anchors, self.vision_dim), (self.config.num_anchors, self.text_dim))
        if (tuple(vision_anchors.shape), tuple(text_anchors.shape)) != expected:
            raise ValueError(
                f"asif anchors must have shapes {expected[0]} and {expected[1]}, got {tuple(vision_anchors.shape)} "
                f"and {tuple(text_anchors.shape)}"
            )
        self.vision_anchors.copy_(vision_anchors.to(self.vision_anchors))
        self.text_anchors.copy_(text_anchors.to(self.text_anchors))
        self.anchors_set.fill_(1)

    def _sparse_relative(self, features: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        if not bool(self.anchors_set):
            raise RuntimeError(
                "asif anchors are not set: run hf_align.train(model, features) (or model.aligner.init_from_data(...)) "
                "on training pairs before embedding"
            )
        similarities = relative_representation(features, anchors)
        values, index = similarities.topk(self.config.resolved_topk, dim=-1)
        values = values.clamp(min=0) ** self.config.power
        return torch.zeros_like(similarities).scatter_(-1, index, values)

    def embed_image(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._sparse_relative(features, self.vision_anchors)

    def embed_text(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._sparse_relative(features, self.text_anchors)

    def embed_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, P, d_v) patch tokens -> (B, P, K) per-patch relative vectors (segmentation)."""
        return self._sparse_relative(tokens, self.vision_anchors)
