"""Process-level settings that change how fast moekit runs: CPU threads and glibc's malloc policy.

Nothing here runs at import time. The ``moekit`` command line calls :func:`configure` before any
command; a library user gets the same speed with one call at the start of the program::

    import moekit.runtime
    moekit.runtime.configure()            # or configure(threads=4)

Why it matters: PyTorch's CPU allocator does not cache, and by default glibc serves every block above
~32 MB with a fresh ``mmap`` that it unmaps on free, so each large activation of every step pays its
first-touch page faults again (~1 ms per MB on these VMs). Measured on the bench shapes, the MoE
layer's forward+backward took 1.5-1.8x as long from a plain Python process as after
:func:`keep_freed_memory` (a dense FFN 1.2-1.4x).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import asdict, dataclass

import torch

__all__ = ["RuntimeSettings", "configure", "decode_threads", "keep_freed_memory", "settings"]

# a decode step's GEMVs split over threads only pay when each thread streams at least this many bytes
# of weights per token. Below it the step is per-op overhead, and every extra OpenMP thread adds a
# barrier per op -- and spins on a core another process may want. Measured on the default LM (~6 MB of
# weights per token, 2 cores): 1 thread 362-401 tokens/s idle and 379-417 beside one CPU-bound process;
# 2 threads 364-433 idle but 87-90 beside it.
MIN_DECODE_BYTES_PER_THREAD = 32 << 20

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# mallopt has no getter: what this process applied is remembered here, so benchmarks can report it
_applied = {"keep_freed_memory": False}


@dataclass(frozen=True)
class RuntimeSettings:
    """What the process runs with; benchmarks print and store it beside their timings."""

    threads: int
    interop_threads: int
    keep_freed_memory: bool  # glibc keeps freed large blocks for reuse (see keep_freed_memory)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        malloc = "glibc keeps freed memory" if self.keep_freed_memory else "glibc default malloc"
        return f"{self.threads} threads, {malloc}"


def keep_freed_memory() -> bool:
    """Ask glibc malloc to serve large blocks from the heap and keep freed memory for reuse.

    Large activations are then reused from step to step instead of re-faulted. Returns False (and
    changes nothing) where glibc is not available.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        return False
    _applied["keep_freed_memory"] = _applied["keep_freed_memory"] or bool(ok)
    return bool(ok)


def configure(threads: int | None = None, *, reuse_memory: bool = True) -> RuntimeSettings:
    """Apply moekit's process settings: ``threads`` intra-op threads (None = leave torch's choice) and,
    with ``reuse_memory``, :func:`keep_freed_memory`. Returns the settings now in force."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads={threads} must be >= 1")
        torch.set_num_threads(threads)
    if reuse_memory:
        keep_freed_memory()
    return settings()


def decode_threads(weight_bytes_per_token: int, cores: int | None = None) -> int:
    """Intra-op threads for decoding a model that reads ``weight_bytes_per_token`` bytes of weights per
    token: one per :data:`MIN_DECODE_BYTES_PER_THREAD`, at least 1 and at most the cores this process
    may run on. Small models get one thread, which is as fast idle and does not fall off a cliff when
    another process competes for the cores."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, weight_bytes_per_token // MIN_DECODE_BYTES_PER_THREAD))


def settings() -> RuntimeSettings:
    """The settings this process runs with now."""
    return RuntimeSettings(torch.get_num_threads(), torch.get_num_interop_threads(), _applied["keep_freed_memory"])
