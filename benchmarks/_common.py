"""What the benchmark scripts share: the machine's description, peak-memory sampling, timing, tables and JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def machine(device: torch.device) -> dict:
    """CPU model, cores, load, library versions and the accelerator the figures were taken on."""
    cpu = platform.processor() or "unknown"
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    import transformers

    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(work: Callable[[], object], device: torch.device, repeat: int = 3) -> dict:
    """Wall-clock seconds of `work()` (device work included): median and best of `repeat` runs after one warm-up."""
    work()
    synchronize(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "best_s": min(times), "runs": len(times)}


class PeakMemory:
    """Peak memory while the `with` block runs.

    CPU: this process's anonymous resident memory (`RssAnon` of /proc/self/status, sampled every 5 ms), so pages of
    memory-mapped files (a dataset, a cache), which the kernel can drop at will, do not count; reported as the peak
    and as the rise over the value at entry. CUDA: `torch.cuda.max_memory_allocated` over the block.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.start_mib = self.peak_mib = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mib = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.start_mib = self.peak_mib = anonymous_rss_mib()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_mib = max(self.peak_mib, anonymous_rss_mib())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mib = max(self.peak_mib, anonymous_rss_mib())

    @property
    def rise_mib(self) -> float:
        return self.peak_mib - self.start_mib


def anonymous_rss_mib() -> float:
    """This process's resident anonymous memory (heap, tensors) in MiB; file-backed pages left out."""
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise OSError("no RssAnon in /proc/self/status (Linux only)")


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    """A Markdown table of `rows` (dicts), numbers rounded to 4 significant digits."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    print(f"\n### {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |")


def write_results(name: str, payload: dict) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
    print(f"\nwrote {path}")
    return path


def top_functions(profile, limit: int = 10) -> list[dict]:
    """The `limit` functions with the most own time in a `cProfile.Profile`."""
    import pstats

    stats = pstats.Stats(profile)
    rows = []
    for (filename, line, name), (_, calls, own, total, _) in stats.stats.items():
        rows.append(
            {"function": f"{os.path.basename(filename)}:{line}({name})", "calls": calls, "own_s": own, "total_s": total}
        )
    rows.sort(key=lambda r: r["own_s"], reverse=True)
    return rows[:limit]
