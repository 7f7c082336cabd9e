"""How many CPU threads torch uses inside hf_align's heavy calls, so that a shared machine does not make them collapse.

Why: torch's OpenMP workers (libgomp in the PyPI wheels) spin-wait at the end of every parallel region for the other
workers of their team. When another process holds one of the cores, the worker scheduled there arrives late at every
region while the others spin for it: on a 2-core machine beside a one-core busy loop, a 256-pair linear-aligner step
went from 10.6 ms to 644 ms at torch's default of 2 threads, and took 36 ms with 1 thread. Fewer threads than the
machine's cores cost little when the machine is shared and the most when it is quiet, so the count follows the load.

The policy (``HF_ALIGN_NUM_THREADS``, read at each call):

* ``auto`` (the default): `train`, `extract_features` and the evaluations run inside `cpu_threads()`. At the start it
  samples for 50 ms how many cores other processes keep busy and gives torch the remaining ones (at least 1, at most
  torch's own setting); during the call `follow_load()` (once per optimiser step or extraction batch) looks
  again at most once a second, from the CPU time counters alone, so a neighbour that starts or stops mid-run is
  followed. torch's setting is restored when the call returns; each new choice is logged once on the
  ``hf_align.utils.cpu_threads`` logger. A quiet machine keeps torch's setting.
* a positive integer: every call runs with that many threads.
* ``torch``: hf_align leaves the count alone (what `torch.set_num_threads` or ``OMP_NUM_THREADS`` chose). An explicit
  ``OMP_NUM_THREADS`` in the environment means the same: the user has already chosen.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import psutil
import torch

logger = logging.getLogger(__name__)

ENV_VAR = "HF_ALIGN_NUM_THREADS"
_START_SAMPLE_SECONDS = 0.05
_RECHECK_SECONDS = 1.0
# Another process's share of a core below this is background noise (an editor, a shell); at or above it the core is
# contended. When our own threads spin on that core the neighbour gets about half of it, so the threshold sits well
# below one half.
_BUSY_THRESHOLD = 0.3

F = TypeVar("F", bound=Callable)
_active = threading.local()  # .governor: the governor of the outermost cpu_threads() block running in this thread
_logged: set[tuple[int, int]] = set()
_start_sample: tuple[float, float] | None = None  # (monotonic time, cores busy elsewhere) of the last start sample


def _available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _CpuClock:
    """CPU seconds spent by the whole machine and by this process since the last reading, and the wall time between."""

    _BUSY_FIELDS = ("user", "system", "nice", "irq", "softirq")

    def __init__(self):
        self._process = psutil.Process()
        self._last = self._read()

    def _read(self) -> tuple[float, float, float]:
        machine, own = psutil.cpu_times(), self._process.cpu_times()
        return (
            time.monotonic(),
            sum(getattr(machine, field, 0.0) for field in self._BUSY_FIELDS),
            own.user + own.system,
        )

    def cores_busy_elsewhere(self) -> float:
        """How many cores other processes kept busy, on average, since the previous call (or construction)."""
        now = self._read()
        (wall0, machine0, own0), (wall1, machine1, own1) = self._last, now
        self._last = now
        return max(0.0, ((machine1 - machine0) - (own1 - own0)) / max(wall1 - wall0, 1e-6))


def threads_for(busy_elsewhere: float, ceiling: int, cores: int) -> int:
    """Torch threads to use when other processes keep `busy_elsewhere` cores busy: the free cores, in [1, ceiling]."""
    contended = int(busy_elsewhere + (1.0 - _BUSY_THRESHOLD))
    return max(1, min(ceiling, cores - contended))


def _requested() -> int | str:
    """`HF_ALIGN_NUM_THREADS` parsed: 'auto', 'torch' or a positive count."""
    setting = os.environ.get(ENV_VAR, "auto").strip().lower()
    if setting in ("auto", "torch"):
        return "torch" if setting == "auto" and "OMP_NUM_THREADS" in os.environ else setting
    if not setting.isdigit() or int(setting) < 1:
        raise ValueError(f"{ENV_VAR} must be 'auto', 'torch' or a positive integer, got {setting!r}")
    return int(setting)


class ThreadGovernor:
    """Keeps torch's thread count at the cores that are free, for the duration of one `cpu_threads()` block."""

    def __init__(self, ceiling: int, follow_load: bool):
        self.ceiling, self.follow_load = ceiling, follow_load
        self._clock = _CpuClock() if follow_load else None
        self._next_check = 0.0

    def start(self) -> None:
        global _start_sample
        if not self.follow_load:
            return
        now = time.monotonic()
        # A loop of small calls (evaluations on a few prompts) shares one start sample instead of paying 50 ms each.
        if _start_sample is None or now - _start_sample[0] > _RECHECK_SECONDS:
            time.sleep(_START_SAMPLE_SECONDS)
            _start_sample = (now, self._clock.cores_busy_elsewhere())
        self._apply(_start_sample[1])
        self._next_check = time.monotonic() + _RECHECK_SECONDS

    def step(self) -> None:
        """Cheap to call often: re-reads the load at most once a second (about 60 µs then), and adapts the count."""
        if self.follow_load and time.monotonic() >= self._next_check:
            self._apply(self._clock.cores_busy_elsewhere())
            self._next_check = time.monotonic() + _RECHECK_SECONDS

    def _apply(self, busy_elsewhere: float) -> None:
        chosen, current = threads_for(busy_elsewhere, self.ceiling, _available_cores()), torch.get_num_threads()
        if chosen == current:
            return
        if (current, chosen) not in _logged:
            _logged.add((current, chosen))
            logger.info(
                "hf_align: torch now uses %d CPU thread(s) (was %d): other processes keep %.1f core(s) busy; "
                "set %s=torch to keep torch's setting, or a number to fix it",
                chosen,
                current,
                busy_elsewhere,
                ENV_VAR,
            )
        torch.set_num_threads(chosen)


_NOOP = ThreadGovernor(ceiling=1, follow_load=False)


@contextmanager
def cpu_threads() -> Iterator[ThreadGovernor]:
    """Run the block under the thread policy above and restore torch's thread count after it.

    Yields the `ThreadGovernor` whose `step()` the block calls between units of work. A block nested in another (an
    evaluation inside `train`) leaves the count to the outer one and gets a governor that does nothing.
    """
    if getattr(_active, "governor", None) is not None:
        yield _NOOP
        return
    previous, requested = torch.get_num_threads(), _requested()
    if isinstance(requested, int):
        torch.set_num_threads(requested)
    governor = ThreadGovernor(ceiling=previous, follow_load=requested == "auto")
    _active.governor = governor
    try:
        governor.start()
        yield governor
    finally:
        _active.governor = None
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def follow_load() -> None:
    """`step()` of the governor of the enclosing `cpu_threads()` block, if any: for loops deep inside a call."""
    governor = getattr(_active, "governor", None)
    if governor is not None:
        governor.step()


def scoped_cpu_threads(function: F) -> F:
    """Decorator: run `function` inside `cpu_threads()`; its loops call `follow_load()` between units of work."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with cpu_threads():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
