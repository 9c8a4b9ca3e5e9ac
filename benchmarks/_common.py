"""Helpers shared by the speed benchmarks: peak memory, timing, model loading, device naming.

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak resident-set growth over
the start of each run, sampled every 2 ms from /proc/self/statm, after returning freed heap memory to the
OS (``malloc_trim``) so that a run does not look smaller by reusing what an earlier run freed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from concept_guard.core.backends.diffusers_backend import DiffusersBackend


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or sampled RSS growth on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self._base)
            time.sleep(0.002)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            release_cpu_memory()
            self._base = self._rss()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()


def release_cpu_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``; no-op elsewhere)."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc).malloc_trim(0)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[dict, Any]:
    """Run ``fn`` once: ``({"seconds", "cpu_seconds", "peak_mem_bytes"}, fn's return value)``.

    ``cpu_seconds`` is the process's CPU time (all threads): on a shared CPU with one thread it is close to
    the wall time the run would take alone, while ``seconds`` also counts time spent descheduled."""
    with PeakMemory(device) as mem:
        start, cpu_start = time.perf_counter(), time.process_time()
        value = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "peak_mem_bytes": int(mem.peak),
    }, value


def build_backend(model: str, device: torch.device) -> DiffusersBackend:
    """``"sd15-random"`` (random-init full-size SD1.5, see ``sd15_random.py``), ``"shapesworld"`` or a path."""
    if model == "sd15-random":
        from sd15_random import sd15_random_pipeline  # sibling module (benchmarks run as scripts)

        return DiffusersBackend.from_pipeline(sd15_random_pipeline().to(device))
    from concept_guard.cli._run import model_path

    return DiffusersBackend.load(model_path(model), device=device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
