"""`codebook`: CODIS-style alignment through a shared codebook of cluster centres (`docs/methods.md` §7).

Both modalities are projected by linear heads into a joint D-dim space spanned by a learnable codebook `C` (K×D,
rows L2-normalised when used). For a batch of pairs:

* student scores `s_v = ẑ_v Ĉᵀ`, `s_t = ẑ_t Ĉᵀ` (ẑ the normalised embeddings the model already computed);
* targets `q_v`, `q_t` = SwAV's equal-partition Sinkhorn–Knopp (`hf_align.functional.ot.sinkhorn`, ε = 0.05, 3 rounds)
on the
  *teacher's* scores, the teacher being an EMA (momentum 0.995) of the heads and the codebook;
* swapped prediction `ℓ = −mean_i Σ_k q_t log softmax(s_v/τ) − mean_i Σ_k q_v log softmax(s_t/τ)` (τ = 0.1): the
  image must predict the code its caption was assigned to, and the other way round.

The model adds the instance-level InfoNCE; `extra_loss` returns `{"codebook": β ℓ}`.

**Small batches: SwAV's queue** (`queue_length`, `queue_start_steps`). With a batch of B < K samples an equal split
over K codes gives each code less than one sample and the targets flatten. Per modality the method keeps a FIFO of the
teacher's past normalised embeddings (never their scores): at each training step the queue is scored against the
*current* teacher codes, Sinkhorn runs on `[queue; batch]` and only the batch's rows are kept; then the batch is pushed
in front and the oldest rows drop out. The queue fills from optimiser step `queue_start_steps` on and is used only
once full. `queue_length="auto"` is `B·(⌈K/B⌉ − 1)` rows when B < K (so B + queue ≥ K, in whole batches; SwAV's
batch-256 runs kept 3840 rows for K = 3000) and no queue when B ≥ K, B being the first training batch's size. The
queue is per process, over the rows that process scores: `hf_align.train` gives every process the whole global batch
(each keeps the same queue), under DDP each process queues its own rows and the Sinkhorn marginals are all-reduced.
Evaluation uses a full queue but never pushes into it.

**Prototype freezing** (`freeze_codebook_steps`): for the first N optimiser steps the student's codebook enters the
loss detached, so it receives no gradient (`grad` stays None: AdamW neither moves nor decays it), as SwAV freezes its
prototypes for the first epoch. Dead-code re-seeding (below) still moves codes.

**Inference uses the student only**: `embed_image` / `embed_text` are the student heads; the codebook is part of the
checkpoint (it is a trained parameter and training can resume from it), the teacher is not. The teacher is a plain
dict of tensors outside the module tree (no parameters, no buffers, nothing in `state_dict`), created from the
student on the first training step and after every (re-)initialisation, so `save_pretrained` / `from_pretrained`
round-trip the inference weights exactly and loading never has to materialise a teacher. A training checkpoint that
stores `training_state()` next to the weights (teacher, queue, counters) resumes exactly (`load_training_state`); one
that does not restarts the teacher from the loaded student with an empty queue.

**Codebook initialisation** (`init_from_data`): seeded, batched k-means in the joint space on *pairs*. Each training
pair is one point `[ẑ_v, ẑ_t] / √2` (both projected with the current heads, normalised); code k is
`normalise(c_v^k + c_t^k)`, the sum of the two halves of centroid k. Why pairs in the projected space: the codes live
in the projected space, so they must be computed there; and before training the two modalities' projections do not
overlap (random heads: the image and text clouds are nearly orthogonal), so k-means on the union of both clouds gives
image-only and text-only codes, and on one modality gives codes the other modality never prefers. Clustering pairs
makes image i and text i prefer the *same* code from the first step, so the swapped-prediction targets agree from the
start. Measured on `make_paired_task(n=2000, seed=0)` (10 clusters), D = 512: the share of pairs whose image and
text pick the same code at step 0 is 0.91 / 0.63 / 0.49 for K = 8 / 32 / 256 with this init, 0.00 with k-means on
the union of both clouds, ≤ 0.05 with k-means on the image embeddings alone, ≤ 0.25 with random codes.

**Diagnostics** (`diagnostics()`): perplexity of the student's hard code assignments over the last window of
`usage_window` steps (both modalities), the number of dead codes (no assignment in that window), the fraction of
pairs whose image and text pick the same code, and how many codes were re-seeded so far. Dead codes are re-seeded at
the end of every window (when `reseed_dead_codes`) from random recent pair embeddings `normalise(ẑ_v + ẑ_t)`, in the
student and the teacher codebooks.

`hf_align.train` calls `init_from_data` before the first step, `after_optimizer_step()` (the EMA update, the window
bookkeeping) after each optimiser step and logs `diagnostics()`; `transformers.Trainer` users get the first two from
`hf_align.integrations.trainer.CardDataCallback`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.ot import in_distributed_group, sinkhorn
from ..utils.checks import nonnegative_int, number, positive_int
from .base import AlignerMethod, MethodConfig
from .citations import CODIS, SWAV, join
from .registry import register_method

MODALITIES = ("vision", "text")

__all__ = ["CodebookAligner", "CodebookConfig", "auto_queue_length", "kmeans", "swapped_prediction_loss"]


@dataclass
class CodebookConfig(MethodConfig):
    """Settings of the `codebook` method.

    projection_dim: width D of the joint space. num_codes: codebook size K. codebook_weight: β, weight of the
    codebook loss next to InfoNCE. code_temperature: τ of the student's softmax over codes (`temperature` is the
    model's InfoNCE temperature). sinkhorn_epsilon /
    sinkhorn_iters: Sinkhorn–Knopp regularisation and rounds (SwAV: 0.05, 3). momentum: EMA momentum of the teacher.
    kmeans_iters: Lloyd iterations of the k-means initialisation. usage_window: steps per diagnostics window.
    reseed_dead_codes: re-seed codes unused over a window. bias: add a bias to each head.
    queue_length: rows of past teacher embeddings per modality added to each Sinkhorn step (SwAV's queue); `"auto"`
    = `B·(⌈K/B⌉ − 1)` for a first training batch of B < K rows, 0 for B ≥ K; 0 = no queue. queue_start_steps:
    optimiser step from which the queue fills (it is used once full). freeze_codebook_steps: optimiser steps during
    which the codebook gets no gradient (SwAV freezes its prototypes for the first epoch).
    """

    projection_dim: int = positive_int(512)
    num_codes: int = positive_int(1024)
    codebook_weight: float = number(1.0, low=0.0)
    code_temperature: float = number(0.1, low=0.0, low_inclusive=False)
    sinkhorn_epsilon: float = number(0.05, low=0.0, low_inclusive=False)
    sinkhorn_iters: int = positive_int(3)
    momentum: float = number(0.995, low=0.0, high=1.0, high_inclusive=False)
    kmeans_iters: int = positive_int(20)
    usage_window: int = positive_int(100)
    reseed_dead_codes: bool = True
    bias: bool = False
    queue_length: int | str = nonnegative_int("auto", also=("auto",), expected="'auto' or an int >= 0 (0 = no queue)")
    queue_start_steps: int = nonnegative_int(0)
    freeze_codebook_steps: int = nonnegative_int(0)


def auto_queue_length(batch_rows: int, num_codes: int) -> int:
    """SwAV-style queue length for `queue_length="auto"`: whole batches making batch + queue >= `num_codes` when the
    batch alone is smaller than the codebook, else 0. E.g. 8 rows, 32 codes -> 24; 256 rows, 3000 codes -> 2816."""
    if batch_rows >= num_codes:
        return 0
    return batch_rows * (math.ceil(num_codes / batch_rows) - 1)


def swapped_prediction_loss(
    scores_v: torch.Tensor, scores_t: torch.Tensor, q_v: torch.Tensor, q_t: torch.Tensor, temperature: float
) -> torch.Tensor:
    """`−mean_i Σ_k q_t[i,k] log softmax(s_v[i]/τ)_k − mean_i Σ_k q_v[i,k] log softmax(s_t[i]/τ)_k`, in fp32.

    scores_*: (B, K) student cosines to the codes; q_*: (B, K) targets (rows sum to 1), treated as constants.
    """
    log_p_v = F.log_softmax(scores_v.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(scores_t.float() / temperature, dim=-1)
    return -(q_t.detach().float() * log_p_v).sum(-1).mean() - (q_v.detach().float() * log_p_t).sum(-1).mean()


@torch.no_grad()
def kmeans(points: torch.Tensor, k: int, n_iters: int = 20, seed: int = 0, batch_size: int = 16384) -> torch.Tensor:
    """Seeded Lloyd k-means, batched over points so memory stays at `batch_size × k`. Returns (k, d) centroids.

    Initial centroids are k distinct points drawn with `torch.Generator().manual_seed(seed)`; a cluster that
    empties is re-seeded at the point currently farthest from its centroid. Stops early once no point changes
    cluster. Runs in fp32 on the points' device.
    """
    if points.dim() != 2:
        raise ValueError(f"k-means needs (n, d) points, got shape {tuple(points.shape)}")
    n = points.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > n:
        raise ValueError(f"k-means with k={k} clusters needs at least {k} points, got {n}")
    x = points.float()
    generator = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(n, generator=generator)[:k].to(x.device)].clone()
    assign = torch.full((n,), -1, dtype=torch.long, device=x.device)
    for _ in range(n_iters):
        new_assign, dist = _nearest(x, centres, batch_size)
        changed = bool((new_assign != assign).any())
        assign = new_assign
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            far = dist.topk(len(empty)).indices
            centres[empty] = x[far]
            changed = True
        if not changed:
            break
    return centres


def _nearest(x: torch.Tensor, centres: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centre of every point and the squared distance to it, in chunks of `batch_size`."""
    centre_sq = (centres * centres).sum(-1)
    index, distance = [], []
    for chunk in x.split(batch_size):
        d = (chunk * chunk).sum(-1, keepdim=True) - 2 * chunk @ centres.t() + centre_sq
        best = d.min(dim=-1)
        index.append(best.indices)
        distance.append(best.values.clamp(min=0))
    return torch.cat(index), torch.cat(distance)


@register_method("codebook")
class CodebookAligner(AlignerMethod):
    """Linear heads into a joint space spanned by a learnable codebook, trained by swapped prediction of Sinkhorn
    assignments computed by an EMA teacher (see the module docstring)."""

    config_class = CodebookConfig
    citation = join(CODIS, SWAV)

    def __init__(self, config: CodebookConfig, vision_dim: int, text_dim: int):
        super().__init__(config, vision_dim, text_dim)
        self.embed_dim = config.projection_dim
        self.vision_head = nn.Linear(vision_dim, config.projection_dim, bias=config.bias)
        self.text_head = nn.Linear(text_dim, config.projection_dim, bias=config.bias)
        self.codebook = nn.Parameter(torch.empty(config.num_codes, config.projection_dim))
        self.reset_parameters()

    # ------------------------------------------------------------------ parameters and teacher
    def reset_parameters(self) -> None:
        nn.init.normal_(self.codebook, std=self.config.projection_dim**-0.5)  # rows of norm ≈ 1, like k-means codes
        self._reset_training_state()

    def _reset_training_state(self) -> None:
        # Plain attributes, deliberately outside the module tree: never saved, never loaded, never optimised.
        self._teacher: dict[str, torch.Tensor] | None = None
        self._usage: torch.Tensor | None = None  # (K,) hard assignments in the current window
        self._agreed: torch.Tensor | None = None  # pairs whose image and text pick the same code (current window)
        self._recent: torch.Tensor | None = None  # (B, D) pair embeddings of the window's last training batch
        self._steps = 0
        self._reseeded = 0
        self._window_stats: dict[str, float] = {}
        # SwAV's queue: rows resolved on the first training batch (None before), then per modality a (rows, D) FIFO of
        # normalised teacher embeddings, newest first, and how many of its rows hold real embeddings.
        self._queue_rows: int | None = None
        self._queue: dict[str, torch.Tensor] = {}
        self._queue_filled = 0

    def teacher_state(self) -> dict[str, torch.Tensor]:
        """The EMA teacher: a copy of each student parameter by name (created from the student on first use)."""
        params = dict(self.named_parameters())
        if self._teacher is None:
            self._teacher = {name: p.detach().clone() for name, p in params.items()}
        else:
            for name, tensor in self._teacher.items():
                ref = params[name]
                if tensor.device != ref.device or tensor.dtype != ref.dtype:
                    self._teacher[name] = tensor.to(device=ref.device, dtype=ref.dtype)
        return self._teacher

    @torch.no_grad()
    def ema_update(self) -> None:
        """`teacher ← m · teacher + (1 − m) · student` for every parameter (m = `momentum`)."""
        teacher = self.teacher_state()
        weight = 1.0 - self.config.momentum
        for name, p in self.named_parameters():
            teacher[name].lerp_(p.detach(), weight)

    def training_state(self) -> dict[str, torch.Tensor]:
        """What a training checkpoint needs beyond `state_dict()` for a resumed run to match an uninterrupted one:
        the teacher (`teacher.<name>`), the step counter and the current window's usage counts (which decide the
        next re-seeding), the queue (`queue.vision`, `queue.text`, and `queue_state` = [rows, or -1 before the first
        training batch resolved them; rows filled]), as tensors so it fits in a safetensors file next to the aligner
        weights."""
        state = {f"teacher.{name}": t.detach().clone() for name, t in self.teacher_state().items()}
        k = self.config.num_codes
        state["usage"] = self._usage.clone() if self._usage is not None else torch.zeros(k, dtype=torch.long)
        state["agreed"] = self._agreed.clone() if self._agreed is not None else torch.tensor(0)
        state["counters"] = torch.tensor([self._steps, self._reseeded])
        if self._recent is not None:
            state["recent"] = self._recent.clone()
        rows = -1 if self._queue_rows is None else self._queue_rows
        state["queue_state"] = torch.tensor([rows, self._queue_filled])
        state.update({f"queue.{modality}": queue.clone() for modality, queue in self._queue.items()})
        return state

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `training_state()` returned (after the student weights are loaded). A state without
        `queue_state` (written before the queue existed) restores with an empty, unresolved queue."""
        params = dict(self.named_parameters())
        required = {f"teacher.{name}" for name in params} | {"usage", "agreed", "counters"}
        optional = {"recent", "queue_state", "queue.vision", "queue.text"}
        if not required <= set(state) <= required | optional:
            raise ValueError(
                f"training state must have keys {sorted(required)} (+ optional {sorted(optional)}), got {sorted(state)}"
            )
        rows, filled = (int(v) for v in state.get("queue_state", torch.tensor([-1, 0])))
        queued = {k for k in state if k.startswith("queue.")}
        shape = (rows, self.config.projection_dim)
        expected = {"queue.vision": shape, "queue.text": shape} if rows > 0 else {}
        found = {k: tuple(state[k].shape) for k in sorted(queued)}
        if found != expected:
            raise ValueError(
                f"training state: queue_state gives {rows} queue rows, so the queue tensors must be "
                f"{expected or 'absent'}; got {found or 'none'}"
            )
        self._reset_training_state()
        self._teacher = {
            name: state[f"teacher.{name}"].to(device=p.device, dtype=p.dtype).clone() for name, p in params.items()
        }
        device = self.codebook.device
        self._usage = state["usage"].to(device).clone()
        self._agreed = state["agreed"].to(device).clone()
        self._steps, self._reseeded = (int(v) for v in state["counters"])
        self._recent = state["recent"].to(device).clone() if "recent" in state else None
        self._queue_rows = None if rows < 0 else rows
        self._queue = {k.removeprefix("queue."): state[k].to(device, torch.float32).clone() for k in queued}
        self._queue_filled = filled

    def after_optimizer_step(self) -> None:
        self.ema_update()
        self._steps += 1
        if self._steps % self.config.usage_window == 0:
            self._close_window()

    # ------------------------------------------------------------------ embeddings and loss
    def embed_image(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.vision_head(features)

    def embed_text(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.text_head(features)

    @property
    def codebook_frozen(self) -> bool:
        """True during the first `freeze_codebook_steps` optimiser steps: the codebook then gets no gradient."""
        return self._steps < self.config.freeze_codebook_steps

    def code_scores(self, embeds: torch.Tensor) -> torch.Tensor:
        """(B, K) cosines between (normalised) embeddings and the student's codes (detached while frozen)."""
        codebook = self.codebook.detach() if self.codebook_frozen else self.codebook
        return F.normalize(embeds.float(), dim=-1) @ F.normalize(codebook.float(), dim=-1).t()

    @torch.no_grad()
    def teacher_embeddings(
        self, vision_features: torch.Tensor, text_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) normalised fp32 embeddings of the image and text features by the teacher's heads."""
        teacher = self.teacher_state()
        out = []
        for modality, features in (("vision", vision_features), ("text", text_features)):
            z = F.linear(features, teacher[f"{modality}_head.weight"], teacher.get(f"{modality}_head.bias"))
            out.append(F.normalize(z.float(), dim=-1))
        return out[0], out[1]

    @torch.no_grad()
    def teacher_codes(self) -> torch.Tensor:
        """(K, D) the teacher's codebook, rows normalised, in fp32."""
        return F.normalize(self.teacher_state()["codebook"].float(), dim=-1)

    @torch.no_grad()
    def assignments(self, modality: str, teacher_embeds: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """(B, K) Sinkhorn targets of a batch of normalised teacher embeddings (B, D) against codes (K, D): over the
        batch alone, or, once the queue of `modality` is full, over `[queue; batch]` with the queue re-scored against
        `codes`, keeping the batch's rows (SwAV)."""
        scores = teacher_embeds @ codes.t()
        queue = self.queue(modality)
        if queue is not None:
            scores = torch.cat([queue @ codes.t(), scores])
        q = sinkhorn(scores, self.config.sinkhorn_epsilon, self.config.sinkhorn_iters)
        return q[queue.shape[0] :] if queue is not None else q

    def queue(self, modality: str) -> torch.Tensor | None:
        """The (rows, D) queue of `modality` ("vision" or "text"), newest first, when full; None otherwise."""
        if not self._queue or self._queue_filled < self._queue_rows:
            return None
        return self._queue[modality]

    @torch.no_grad()
    def _push(self, z_v: torch.Tensor, z_t: torch.Tensor) -> None:
        """After a training batch: resolve the queue length on the first one, then (from `queue_start_steps` on)
        put the batch's teacher embeddings in front and drop the oldest rows."""
        if self._queue_rows is None:
            length = self.config.queue_length
            self._queue_rows = auto_queue_length(z_v.shape[0], self.config.num_codes) if length == "auto" else length
            if self._queue_rows:
                self._queue = {m: torch.zeros(self._queue_rows, z_v.shape[1], device=z_v.device) for m in MODALITIES}
        rows = self._queue_rows
        if rows == 0 or self._steps < self.config.queue_start_steps:
            return
        for modality, z in zip(MODALITIES, (z_v, z_t)):
            self._queue[modality] = torch.cat([z, self._queue[modality].to(z.device)])[:rows]
        self._queue_filled = min(rows, self._queue_filled + z_v.shape[0])

    def extra_loss(self, vision_features, text_features, image_embeds, text_embeds) -> dict[str, torch.Tensor]:
        cfg = self.config
        scores_v, scores_t = self.code_scores(image_embeds), self.code_scores(text_embeds)
        codes = self.teacher_codes()
        z_v, z_t = self.teacher_embeddings(vision_features, text_features)
        q_v, q_t = self.assignments("vision", z_v, codes), self.assignments("text", z_t, codes)
        loss = swapped_prediction_loss(scores_v, scores_t, q_v, q_t, cfg.code_temperature)
        if self.training:
            self._push(z_v, z_t)
            self._record(scores_v, scores_t, image_embeds, text_embeds)
        return {"codebook": cfg.codebook_weight * loss}

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_from_data(
        self,
        vision_features: torch.Tensor,
        text_features: torch.Tensor,
        seed: int = 0,
        vision_mask: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> None:
        """Codebook = k-means of the training pairs in the joint space (see the module docstring); resets the
        teacher and the diagnostics."""
        n, k = vision_features.shape[0], self.config.num_codes
        if text_features.shape[0] != n:
            raise ValueError(
                f"init_from_data needs paired features, got {n} image and {text_features.shape[0]} text rows"
            )
        if k > n:
            raise ValueError(
                f"codebook: num_codes={k} codes need at least {k} training pairs for the k-means initialisation, but "
                f"init_from_data got {n}. Lower num_codes to at most {n}, or give it more pairs: hf_align.train passes "
                "min(AlignmentArguments.init_samples, number of training pairs), so raise init_samples if the "
                "training set is larger, or add training data"
            )
        device = self.codebook.device
        width = self.config.projection_dim
        points = torch.empty(n, 2 * width, device=device)
        for start in range(0, n, 8192):
            stop = start + 8192
            v = vision_features[start:stop].to(device=device, dtype=self.vision_head.weight.dtype)
            t = text_features[start:stop].to(device=device, dtype=self.text_head.weight.dtype)
            points[start:stop, :width] = F.normalize(self.vision_head(v).float(), dim=-1)
            points[start:stop, width:] = F.normalize(self.text_head(t).float(), dim=-1)
        centres = kmeans(points / math.sqrt(2.0), k, self.config.kmeans_iters, seed)
        codes = F.normalize(centres[:, :width] + centres[:, width:], dim=-1)
        self.codebook.copy_(codes.to(self.codebook.dtype))
        self._reset_training_state()

    # ------------------------------------------------------------------ diagnostics and dead codes
    @torch.no_grad()
    def _record(self, scores_v, scores_t, image_embeds, text_embeds) -> None:
        hard_v, hard_t = scores_v.argmax(-1), scores_t.argmax(-1)
        counts = torch.bincount(torch.cat([hard_v, hard_t]), minlength=self.config.num_codes)
        self._usage = counts if self._usage is None else self._usage.to(counts.device) + counts
        agreed = (hard_v == hard_t).sum()  # stays a tensor: no device sync on the training step
        self._agreed = agreed if self._agreed is None else self._agreed.to(agreed.device) + agreed
        if (self._steps + 1) % self.config.usage_window == 0:  # the batch before the window closes seeds dead codes
            self._recent = F.normalize(
                F.normalize(image_embeds.detach().float(), dim=-1) + F.normalize(text_embeds.detach().float(), dim=-1),
                dim=-1,
            )

    @torch.no_grad()
    def _close_window(self) -> None:
        """End of a diagnostics window: summarise usage, re-seed dead codes, start a new window."""
        if self._usage is None or not self._usage.any():
            return
        usage = self._usage.float()
        agreed = self._agreed.to(usage)
        if in_distributed_group():
            torch.distributed.all_reduce(usage)
            torch.distributed.all_reduce(agreed)
        dead = (usage == 0).nonzero().flatten()
        self._window_stats = {
            "codebook_perplexity": _perplexity(usage),
            "codebook_dead_codes": float(len(dead)),
            "codebook_pair_agreement": float(2 * agreed / usage.sum()),  # each pair adds 2 to usage
        }
        if self.config.reseed_dead_codes and len(dead) and self._recent is not None:
            self._reseed(dead)
        self._usage = self._agreed = None

    @torch.no_grad()
    def _reseed(self, dead: torch.Tensor) -> None:
        """Move dead codes (student and teacher) onto random recent pair embeddings, plus a little noise."""
        recent = self._recent.to(self.codebook.device)
        pick = torch.randint(0, recent.shape[0], (len(dead),), device=recent.device)
        new = F.normalize(recent[pick] + 0.01 * torch.randn_like(recent[pick]), dim=-1)
        dead = dead.to(self.codebook.device)
        scale = self.codebook.detach().norm(dim=-1).mean()  # keep the raw rows' scale (only directions matter)
        self.codebook[dead] = (new * scale).to(self.codebook.dtype)
        if in_distributed_group():  # every process must hold the same codebook: take rank 0's choice
            torch.distributed.broadcast(self.codebook.data, src=0)
        teacher = self.teacher_state()
        teacher["codebook"][dead] = self.codebook.detach()[dead]
        self._reseeded += len(dead)

    def diagnostics(self) -> dict[str, float]:
        """Floats for the training log: `codebook_perplexity` (of the hard assignments over the last completed window,
        1 = collapse, K = uniform use), `codebook_dead_codes`, `codebook_pair_agreement` (image and text pick the same
        code), `codebook_reseeded` (total so far). Before the first window closes, the figures cover the steps so far.
        """
        stats = dict(self._window_stats)
        if not stats and self._usage is not None:
            usage = self._usage.float()
            stats = {
                "codebook_perplexity": _perplexity(usage),
                "codebook_dead_codes": float((usage == 0).sum()),
                "codebook_pair_agreement": float(2 * self._agreed / usage.sum()),
            }
        stats["codebook_reseeded"] = float(self._reseeded)
        if self._queue_rows:
            stats["codebook_queue_filled"] = float(self._queue_filled)
        return stats


def _perplexity(counts: torch.Tensor) -> float:
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p * torch.log(p.clamp(min=1e-30))).sum()
    return float(torch.exp(entropy))
