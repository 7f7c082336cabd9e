"""Process-group helpers for work launched as several processes (`accelerate launch`, `torchrun`).

One process runs everything as usual. Under a launcher, `process_state()` gives this process's rank, the process
count and its device, `on_main` runs a step on the main process only and hands its result (or its exception) to all,
and `on_every_process` runs a step everywhere and gathers what each process produced. Without CUDA the processes join
a gloo group (`cpu_process_group`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "average_gradients",
    "broadcast",
    "cpu_process_group",
    "gather_rows",
    "on_every_process",
    "on_main",
    "process_state",
]


def cpu_process_group() -> bool:
    """Whether this process is one of several launched (`accelerate launch`, `torchrun`) on a machine without CUDA:
    Accelerate then has to be told `cpu=True` to join them in a gloo group instead of running each alone."""
    from accelerate.utils import parse_flag_from_env

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return parse_flag_from_env("ACCELERATE_USE_CPU") or (launched and not torch.cuda.is_available())


def process_state():
    """Accelerate's `PartialState`: one process, or this process's rank, count and device under a launcher."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_process_group())


def broadcast(objects: list) -> list:
    """The main process's `objects` (a list of picklable values), in every process."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list(objects, from_process=0)


def on_main(state, work: Callable[[], Any]) -> Any:
    """`work()` run by the main process only; every process gets its (picklable) result, or raises its exception
    (which the other processes would otherwise never hear of, waiting forever for the main one)."""
    if state.num_processes == 1:
        return work()
    outcome, error = [None], None
    if state.is_main_process:
        try:
            outcome = [(True, work())]
        except Exception as err:
            outcome, error = [(False, err)], err
    succeeded, value = broadcast(outcome)[0]
    if not succeeded:
        raise error or value
    return value


def on_every_process(work: Callable[[], tuple[int, list]]) -> tuple[int, list]:
    """`work() -> (count, items)` run by every process: the summed counts and the items in rank order, everywhere;
    or, if any process failed, its error everywhere (the lowest failing rank's where this process did not fail)."""
    from accelerate.utils import gather_object

    try:
        outcome = (True, work())
    except Exception as err:
        outcome = (False, err)
    outcomes = gather_object([outcome])
    failures = [value for succeeded, value in outcomes if not succeeded]
    if failures:
        raise outcome[1] if not outcome[0] else failures[0]
    return sum(value[0] for _, value in outcomes), [item for _, value in outcomes for item in value[1]]


class _GatherRows(torch.autograd.Function):
    """All-gather of (B_r, ...) rows padded to a common B; backward sums the gradient of the gathered tensor over
    the processes (each computed the same loss from it) and returns this process's rows."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, padded_rows: int) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), local.shape[0]
        padded = torch.cat([local, local.new_zeros((padded_rows - local.shape[0], *local.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, padded.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank, : ctx.rows], None


def gather_rows(local: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """(bounds[r+1] - bounds[r], ...) rows from each process r -> all (bounds[-1], ...) rows in rank order."""
    sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    parts = _GatherRows.apply(local, max(sizes))
    return torch.cat([parts[r, :size] for r, size in enumerate(sizes)])


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Replace each gradient by its mean over the processes, in one all-reduce of the concatenated gradients."""
    with_grad = [p for p in params if p.grad is not None]  # None on every process alike (same loss graph)
    if not with_grad:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in with_grad])
    dist.all_reduce(flat)
    flat /= world
    for p, chunk in zip(with_grad, flat.split([p.numel() for p in with_grad])):
        p.grad.copy_(chunk.view_as(p.grad))
