"""Memory accounting for offloaded inference: anonymous vs file-backed RSS, page cache, peaks, bandwidth.

Anonymous RSS (``RssAnon`` in /proc/self/status) is the heap: resident weights, the expert cache's
buffers, activations. File-backed RSS (``RssFile``) counts mapped file pages (a memory-mapped checkpoint
read through safetensors' mmap); the page cache (``Cached`` in /proc/meminfo, machine-wide) grows with
every file read that is not dropped.
"""
from __future__ import annotations

import os
import threading
import time

import torch

__all__ = ["PeakRSS", "cached_bytes", "memory_bandwidth_gbps", "page_cache_bytes", "parse_budget", "rss",
           "sequential_read_gbps"]


def rss() -> dict[str, int]:
    """{"anon": bytes, "file": bytes, "peak": VmHWM bytes} of this process."""
    out = {"anon": 0, "file": 0, "peak": 0}
    names = {"RssAnon:": "anon", "RssFile:": "file", "VmHWM:": "peak"}
    with open("/proc/self/status") as f:
        for line in f:
            k = line.split(":", 1)[0] + ":"
            if k in names:
                out[names[k]] = int(line.split()[1]) * 1024
    return out


def page_cache_bytes() -> int:
    """The machine's page cache (``Cached`` of /proc/meminfo; other processes move it too)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Samples RssAnon / RssFile on a background thread every ``interval`` s; ``sample()`` adds a point."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak_anon = self.peak_file = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        r = rss()
        self.peak_anon = max(self.peak_anon, r["anon"])
        self.peak_file = max(self.peak_file, r["file"])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakRSS:
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True, name="moekit-rss")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


def memory_bandwidth_gbps(nbytes: int = 1 << 30, reps: int = 3) -> float:
    """Sequential read bandwidth of RAM: best of ``reps`` sums of an ``nbytes`` fp32 tensor (decimal GB/s)."""
    x = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    del x
    return nbytes / best / 1e9


def sequential_read_gbps(files: list, limit: int = 1 << 30, block: int = 16 << 20) -> float:
    """Cold sequential read bandwidth of the files (page cache dropped first, up to ``limit`` bytes)."""
    buf = bytearray(block)
    mv, total, t = memoryview(buf), 0, 0.0
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            off, t0 = 0, time.perf_counter()
            while total < limit:
                n = os.preadv(fd, [mv], off)
                if n <= 0:
                    break
                off += n
                total += n
            t += time.perf_counter() - t0
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if total >= limit:
            break
    return total / max(t, 1e-9) / 1e9


def cached_bytes(ranges: dict) -> int:
    """Bytes of the page cache holding the given file ranges ({file: [(offset, nbytes), ...]}), by mincore(2)
    over a fresh mapping (which touches no page)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page, total = mmap.PAGESIZE, 0
    for file, spans in ranges.items():
        size = os.path.getsize(file)
        if size == 0:
            continue
        fd = os.open(file, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap of {file} failed")
            try:
                vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
                if libc.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore of {file} failed")
                resident = bytes(vec)
                for off, n in spans:
                    a, b = off // page, (off + n + page - 1) // page
                    total += sum(1 for v in resident[a:b] if v & 1) * page
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return total


def parse_budget(budget: int | str | None) -> int | str:
    """``"all"`` -> "all"; ``0``/``"0"`` -> 0 (no cache); ``"2GiB"``, ``"500MB"``, ints -> bytes."""
    from moekit.hf.common import parse_size

    if isinstance(budget, str) and budget.strip().lower() == "all":
        return "all"
    try:
        return parse_size(budget if isinstance(budget, int) else budget.strip())
    except ValueError:
        raise ValueError(f"expert memory {budget!r} must be a size like 2GiB or 500MB, 0 (no cache) or all") from None
