"""`csa`: Canonical Similarity Analysis, training-free alignment by canonical correlation analysis (Li, Chinchali and
Topcu, "CSA: Data-efficient mapping of unimodal features to multimodal features", ICLR 2025; `docs/methods.md`, CSA).

**Fit** (`init_from_data`, once, on the training pairs; nothing else trains). With the features centred by their
training means `μ_v`, `μ_t`, covariances `C_vv`, `C_tt` and cross-covariance `C_vt`, CCA finds `A_v` (d_v × s),
`A_t` (d_t × s) whose columns are the canonical directions:

    W_v = C_vv^{-1/2},  W_t = C_tt^{-1/2}          (pseudo-inverse square roots: directions of zero variance dropped)
    W_v C_vt W_t = U diag(ρ) Vᵀ                     (SVD, ρ₁ ≥ ρ₂ ≥ … the canonical correlations)
    A_v = W_v U[:, :s],  A_t = W_t V[:, :s]          (canonical variates of unit variance, pairwise correlation ρ_i)

**Similarity** (the authors' `weighted_corr_sim`): an image and a caption are projected, `u = A_vᵀ (x − μ_v)`,
`v = A_tᵀ (y − μ_t)`, each L2-normalised, and scored by a correlation-weighted cosine

    sim(x, y) = Σ_i w_i û_i v̂_i,    w_i = | mean over the training pairs n of û_{n,i} v̂_{n,i} |

(`w` as the authors' code computes it from the normalised training variates; `equal_weights=True` sets w = 1, the
plain cosine in the canonical space). The model L2-normalises embeddings and scores pairs by its similarity head, so
the method returns `[√w ⊙ û, √(1 − Σ w û²), 0]` for an image and `[√w ⊙ v̂, 0, √(1 − Σ w v̂²)]` for a caption: both
unit vectors (w_i ≤ 1), whose dot product is exactly `sim(x, y)`. Their width is `s + 2`; under `cosine` or `dot`
the model's scores are the authors' scores, and the other fixed heads rank by monotone functions of them.

**Authors' defaults** (the CSA configurations in PAL's and STRUCTURE's code): s = 256 for ViT-S + MiniLM (384-wide
features), 512 for the 1024-wide pairs; correlation weights on; no ridge; no STRUCTURE. `projection_dim="auto"`
(the default) gives `min(512, ⌊2·min(d_v, d_t)/3⌋)`, which reproduces both (256 of 384, 512 of 1024). The rule is
ours.

**STRUCTURE.** The STRUCTURE authors compose it with CSA inside the fit (their `CCA_RS`), not as a training-time
term: after the analytic CCA, `A_v`, `A_t` are refined for `refine_epochs` epochs of Adam (lr `refine_lr`) on
mini-batches of `refine_batch_size` centred pairs, minimising

    refine_weight · ½ [R_S(X, Z_v) + R_S(Y, Z_t)]  −  refine_cca_weight · Σ_{n,i} Z_v[n,i] Z_t[n,i] / s,
    Z_v = normalise(X A_v),  Z_t = normalise(Y A_t)

(R_S: `hf_align.regularizers.structure.structure_regularizer` with `levels=refine_levels`, `tau=refine_tau`), then
each `A` is re-whitened, `A ← A (Aᵀ C A)^{-1/2}`, so the variates have unit covariance again; the weights `w` are
computed after it. `refine_weight=0` (the default) skips it; the authors' STRUCTURE configuration is
`refine_weight=10, refine_cca_weight=0.01, refine_levels=1, refine_tau=0.2, refine_epochs=10, refine_lr=5e-4,
refine_batch_size=4096`. The `structure` regulariser (`structure_weight=...`) adds a term to the training loss, and a
training-free method runs no training step, so the model refuses any regulariser with a training-free method
(`hf_align.model.aligner_parts.check_parts`), naming the `refine_*` settings.

**Deviations.**
- The CCA is closed form in `torch.linalg` (float64 eigendecompositions and one SVD), not scikit-learn's
  `cross_decomposition.CCA`, which is iterative (NIPALS, one component at a time). Measured on one CPU thread, 1000
  pairs: 384 + 384 dimensions, 0.29 s per component in scikit-learn (≈ 74 s for s = 256) against 0.19 s for every
  component in closed form; 1280 + 384 (EfficientNet-Lite0 + MiniLM widths), 0.53–0.58 s per component (≈ 140 s for
  s = 256) against 0.65 s. The authors use `cca_zoo` (not a dependency), also closed form. A test checks the canonical
  correlations against scipy's principal angles.
- The authors (through `cca_zoo`) project on a PCA basis first; the pseudo-inverse square root here drops the
  directions whose variance is below `1e-10` of the largest, which is the same for full-rank data and keeps
  rank-deficient data (fewer pairs than dimensions) finite.
- `regularization=0.01` by default (ridge `C + r·mean(diag C)·I` on both covariances); the authors' CCA has none
  (`regularization=0`). With fewer pairs than d_v + d_t dimensions, plain CCA is degenerate: at least
  d_v + d_t − N + 1 canonical correlations are exactly 1 on the training pairs, whatever the data, and retrieval is at
  chance. Held-out R@1 % (image→text), by r:

  | data | N | r = 0 | 0.01 | 0.1 | 1 |
  |---|---|---|---|---|---|
  | synthetic task, 64 + 48 dims, s = 16, 3 seeds | 100 | 4.6 | 27.6 | 24.3 | 9.1 |
  | | 1 000 | 48.7 | 49.5 | 32.4 | 11.3 |
  | 8 planted dims in 500 + 300, noise 3, s = 8 | 600 | 0.2 | 83.8 | 94.6 | 97.4 |
  | | 3 000 | 95.8 | 96.2 | 97.2 | 98.2 |

  0.01 was never below r = 0 in these runs; the best r depends on the data (sweep it on a held-out split).
- The STRUCTURE refinement draws its mini-batches with `torch.Generator` seeded by `init_from_data`'s `seed`.

The fitted means, directions and weights are buffers, saved by `save_pretrained` and restored by `from_pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..functional.structure import structure_regularizer
from ..regularizers.structure import StructureRegularizer
from ..utils.checks import number, positive_int
from .base import AlignerMethod, MethodConfig
from .citations import CSA, join
from .registry import register_method

MAX_AUTO_DIM = 512  # the authors' largest s
RANK_TOLERANCE = 1e-10  # covariance eigenvalues below this fraction of the largest count as zero variance


def auto_projection_dim(vision_dim: int, text_dim: int) -> int:
    """`projection_dim="auto"`: `min(512, ⌊2·min(d_v, d_t)/3⌋)` canonical dimensions (256 of 384, 512 of 1024)."""
    return max(1, min(MAX_AUTO_DIM, 2 * min(vision_dim, text_dim) // 3))


@dataclass
class CSAConfig(MethodConfig):
    """projection_dim: s, the canonical dimensions kept (an int ≤ min(d_v, d_t), or `"auto"`, see the module
    docstring). equal_weights: score by the plain cosine in the canonical space instead of weighting dimension i by
    its training correlation. regularization: ridge r added to both covariances as `r·mean variance·I` (0 is the
    authors' plain CCA; the default 0.01 keeps the fit from degenerating with fewer pairs than d_v + d_t). refine_*: the
    STRUCTURE refinement of the fit (off while `refine_weight` is 0)."""

    check_prefix = "csa: "

    projection_dim: int | str = positive_int("auto", also=("auto",))
    equal_weights: bool = False
    regularization: float = number(0.01, low=0.0)
    refine_weight: float = number(0.0, low=0.0)
    refine_cca_weight: float = number(0.01, low=0.0)
    refine_levels: int = positive_int(1)
    refine_tau: float = number(0.2, low=0.0, low_inclusive=False)
    refine_epochs: int = positive_int(10)
    refine_lr: float = number(5e-4, low=0.0, low_inclusive=False)
    refine_batch_size: int = positive_int(4096)

    def __post_init__(self):
        super().__post_init__()
        if self.refine_batch_size < 2:
            raise ValueError(
                f"csa: refine_batch_size must be at least 2 (STRUCTURE compares samples), got {self.refine_batch_size}"
            )


def _inverse_sqrt(covariance: torch.Tensor) -> torch.Tensor:
    """(d, d) symmetric PSD -> (d, r) `V Λ^{-1/2}` over its r eigenvalues above `RANK_TOLERANCE` of the largest, so
    that `Wᵀ C W = I_r` (a whitening of the directions that vary)."""
    values, vectors = torch.linalg.eigh(covariance)
    keep = values > values.max().clamp(min=0) * RANK_TOLERANCE
    return vectors[:, keep] * values[keep].rsqrt()


def _covariance(x: torch.Tensor, regularization: float) -> torch.Tensor:
    """Sample covariance of centred rows, plus `regularization` times the mean variance on the diagonal (scale-free
    ridge)."""
    covariance = x.T @ x / (x.shape[0] - 1)
    if regularization:
        covariance = covariance + regularization * covariance.diagonal().mean() * torch.eye(
            x.shape[1], dtype=x.dtype, device=x.device
        )
    return covariance


def canonical_correlation_analysis(
    vision: torch.Tensor, text: torch.Tensor, dims: int, regularization: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form CCA of centred (N, d_v) / (N, d_t) features -> (A_v (d_v, s), A_t (d_t, s), ρ (s,)), in float64.

    The canonical variates `vision @ A_v`, `text @ A_t` have unit variance and correlation ρ_i in dimension i (with
    `regularization` r > 0, of the ridge-regularised covariances `C + r·mean(diag C)·I`, the variances slightly below
    1). `ValueError` when the data determine fewer than `dims` directions (too few pairs or rank-deficient features)."""
    n = vision.shape[0]
    w_v = _inverse_sqrt(_covariance(vision, regularization))
    w_t = _inverse_sqrt(_covariance(text, regularization))
    available = min(w_v.shape[1], w_t.shape[1])
    if dims > available:
        raise ValueError(
            f"csa: projection_dim={dims} canonical dimensions asked for, but the {n} training pairs determine only "
            f"{available} (the ranks of the centred vision / text features are {w_v.shape[1]} / {w_t.shape[1]}): "
            "lower projection_dim or give more pairs (AlignmentArguments.init_samples)"
        )
    left, correlations, right_t = torch.linalg.svd(w_v.T @ (vision.T @ text / (n - 1)) @ w_t, full_matrices=False)
    return w_v @ left[:, :dims], w_t @ right_t[:dims].T, correlations[:dims]


@register_method("csa")
class CSAAligner(AlignerMethod):
    config_class = CSAConfig
    trainable = False
    # the fit is CSA's; its optional refinement is STRUCTURE's (`refine_*`)
    citation = join(CSA, StructureRegularizer.citation)

    def __init__(self, config: CSAConfig, vision_dim: int, text_dim: int):
        super().__init__(config, vision_dim, text_dim)
        dims = auto_projection_dim(vision_dim, text_dim) if config.projection_dim == "auto" else config.projection_dim
        if dims > min(vision_dim, text_dim):
            raise ValueError(
                f"csa: projection_dim={dims} must not exceed the narrower feature width min(d_v, d_t) = "
                f"{min(vision_dim, text_dim)} (CCA finds at most that many canonical dimensions)"
            )
        self.dims = dims
        self.embed_dim = dims + 2  # + one padding coordinate per modality (module docstring)
        self.register_buffer("vision_mean", torch.zeros(vision_dim))
        self.register_buffer("text_mean", torch.zeros(text_dim))
        self.register_buffer("vision_directions", torch.zeros(vision_dim, dims))
        self.register_buffer("text_directions", torch.zeros(text_dim, dims))
        self.register_buffer("canonical_correlations", torch.zeros(dims))
        self.register_buffer("weights", torch.zeros(dims))
        # 1 once init_from_data has run; saved with the fit so a reloaded model knows it is ready.
        self.register_buffer("fitted", torch.zeros((), dtype=torch.uint8))

    @torch.no_grad()
    def init_from_data(self, vision_features, text_features, seed=0, vision_mask=None, text_mask=None) -> None:
        """Fit the CCA (and the STRUCTURE refinement when `refine_weight > 0`) on the (N, d) training pairs."""
        if vision_features.shape[0] != text_features.shape[0] or vision_features.shape[0] < 2:
            raise ValueError(
                f"csa needs at least 2 paired rows to fit, got {vision_features.shape[0]} vision and "
                f"{text_features.shape[0]} text rows"
            )
        vision, text = vision_features.double(), text_features.double()
        vision_mean, text_mean = vision.mean(0), text.mean(0)
        vision, text = vision - vision_mean, text - text_mean
        a_v, a_t, correlations = canonical_correlation_analysis(vision, text, self.dims, self.config.regularization)
        if self.config.refine_weight > 0:
            a_v, a_t = self._refine(vision, text, a_v, a_t, seed)
        unit_v = F.normalize(vision @ a_v, dim=-1)
        unit_t = F.normalize(text @ a_t, dim=-1)
        weights = (
            torch.ones(self.dims, dtype=torch.float64, device=vision.device)
            if self.config.equal_weights
            else (unit_v * unit_t).mean(0).abs()
        )
        for name, value in (
            ("vision_mean", vision_mean),
            ("text_mean", text_mean),
            ("vision_directions", a_v),
            ("text_directions", a_t),
            ("canonical_correlations", correlations),
            ("weights", weights),
        ):
            getattr(self, name).copy_(value)
        self.fitted.fill_(1)

    @torch.enable_grad()
    def _refine(self, vision, text, a_v, a_t, seed) -> tuple[torch.Tensor, torch.Tensor]:
        """The STRUCTURE authors' post-hoc refinement of the CCA directions, then re-whitening (module docstring)."""
        cfg = self.config
        directions = [a_v.float().clone().requires_grad_(True), a_t.float().clone().requires_grad_(True)]
        views = (vision.float(), text.float())
        optimizer = torch.optim.Adam(directions, lr=cfg.refine_lr)
        generator = torch.Generator().manual_seed(seed)
        n = vision.shape[0]
        for _ in range(cfg.refine_epochs):
            order = torch.randperm(n, generator=generator).to(vision.device)
            for start in range(0, n, cfg.refine_batch_size):
                rows = order[start : start + cfg.refine_batch_size]
                if len(rows) < 2:  # STRUCTURE compares samples: a last batch of one has nothing to compare
                    continue
                batch = [view[rows] for view in views]
                z_v, z_t = (F.normalize(x @ a, dim=-1) for x, a in zip(batch, directions))
                structure = sum(
                    structure_regularizer(x, z, levels=cfg.refine_levels, tau=cfg.refine_tau)
                    for x, z in zip(batch, (z_v, z_t))
                )
                agreement = (z_v * z_t).sum() / self.dims
                loss = cfg.refine_weight * structure / 2 - cfg.refine_cca_weight * agreement
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        whitened = []
        with torch.no_grad():
            for x, a in zip((vision, text), directions):
                a = a.double()
                values, vectors = torch.linalg.eigh(a.T @ x.T @ x @ a / n)
                whitened.append(a @ (vectors * values.rsqrt()) @ vectors.T)
        return whitened[0], whitened[1]

    def _project(self, features, mean, directions, slot: int) -> torch.Tensor:
        if not bool(self.fitted):
            raise RuntimeError(
                "csa is not fitted: run hf_align.train(model, features) (or model.aligner.init_from_data(...)) on "
                "training pairs before embedding"
            )
        unit = F.normalize((features - mean.to(features.dtype)) @ directions.to(features.dtype), dim=-1)
        weights = self.weights.to(unit.dtype)
        # float32 for the padding coordinate: 1 − Σ w û² loses everything under bf16 when it is small
        padding = (1 - (weights * unit.float() ** 2).sum(-1, keepdim=True).float()).clamp(min=0).sqrt().to(unit.dtype)
        out = unit.new_zeros(unit.shape[0], self.embed_dim)
        out[:, : self.dims] = weights.sqrt() * unit
        out[:, self.dims + slot] = padding[:, 0]
        return out

    def embed_image(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._project(features, self.vision_mean, self.vision_directions, 0)

    def embed_text(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._project(features, self.text_mean, self.text_directions, 1)

    def canonical_similarity(self, vision_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """(N_i, d_v), (N_t, d_t) -> (N_i, N_t) `Σ_i w_i û_i v̂_i`, the authors' score, without the padding coordinates
        (what the model's cosine scores equal)."""
        return self.embed_image(vision_features)[:, : self.dims] @ self.embed_text(text_features)[:, : self.dims].T


__all__ = ["CSAAligner", "CSAConfig", "auto_projection_dim", "canonical_correlation_analysis"]
