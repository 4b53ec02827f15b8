"""Measuring peak memory and time of a piece of work, on CUDA or on the CPU.

On CUDA the peak is ``torch.cuda.max_memory_allocated``. On the CPU there is no allocator counter, so the
peak is the highest running sum of the allocations and frees that ``torch.profiler`` records with
``profile_memory=True`` (its "[memory]" events), i.e. the CPU analogue of ``max_memory_allocated``
counted from the start of the profiled region. Process RSS is also reported, but the C allocator's
caching blurs it.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Measurement", "measure_peak_bytes", "time_call", "peak_rss_bytes", "physical_memory_bytes"]


@dataclass(frozen=True)
class Measurement:
    """Peak memory (bytes above what was allocated before the call) and median wall time (s)."""

    peak_bytes: int
    seconds: float


def physical_memory_bytes() -> float:
    """This machine's physical memory in bytes (inf where it cannot be read)."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return math.inf


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_peak_from_profiler(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        fn()
    # the raw kineto events hold every allocation (+bytes) and free (-bytes), including those inside ops
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def measure_peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated while ``fn`` runs, above the level at its start."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    return _cpu_peak_from_profiler(fn)


def time_call(fn: Callable[[], object], repeats: int = 3, warmup: int = 1, device: torch.device | str = "cpu") -> float:
    """Median wall time of ``fn`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
