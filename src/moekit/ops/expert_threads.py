"""Run a per-expert function over the experts' row runs, whole experts spread across CPU threads.

Why: a fine-grained MoE (many experts, a few hundred rows each) runs one small GEMM per expert. Split
over the intra-op threads, each small GEMM pays a thread barrier and every thread re-packs the
expert's cold weight block; giving each core whole experts (one single-threaded GEMM at a time)
avoids both. Measured on 2 AVX-512 cores, idle machine, 64 experts x ~256 rows (bench shape B):
gate+up GEMMs (1024 -> 2 x 512) ~265 GFLOP/s expert-serial vs ~290 expert-parallel, down GEMMs
(512 -> 1024) ~250 vs ~280; the dense 2048-row GEMMs of the same FLOPs: ~310-330.

How: a small pool of persistent worker threads, each pinned to one intra-op thread once, when the
pool is made (``torch.set_num_threads`` in a worker also moves the process-wide default that new
threads start from, so the caller's count is re-asserted right after). The caller's own thread
count is never changed per call: switching the OpenMP team size on every call was measured to cost
more than it saves. ``torch.mm`` releases the GIL, so the workers' GEMMs run concurrently; each call
writes a disjoint slice of a preallocated output, so the join is the only synchronisation.
Small problems (decode steps, tiny models) stay serial with multi-threaded GEMMs, where the
matmuls are too small for whole-expert parallelism to pay off or leave too few experts to balance.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

__all__ = ["expert_runs", "balanced_chunks", "for_each_expert", "use_expert_threads"]

# whole-expert parallelism needs enough rows per expert for a single-threaded GEMM to be efficient,
# enough work per expert to hide the hand-off to the workers (the caller's idle OpenMP threads spin
# for a while after each parallel op and compete with them), and enough non-empty experts per
# thread for the row counts to balance. Measured: the default LM (d 128, 8 experts of hidden 256,
# ~512 rows each, 17M multiply-adds per expert GEMM) trains 17% slower with expert threads; shape B
# of `moekit bench layer` (256 rows x 1024 x 512, 134M) runs 4% (forward) and 10% (forward+backward)
# faster, shape A 1-2%.
MIN_MEAN_ROWS = 64
MIN_MACS_PER_EXPERT = 1 << 26
MIN_RUNS_PER_THREAD = 4

_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}  # (pid, workers) -> pool; rebuilt after fork
_pools_lock = threading.Lock()


def expert_runs(counts: list[int]) -> list[tuple[int, slice]]:
    """(expert, row slice) for every expert with at least one row; rows are grouped by expert."""
    runs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            runs.append((e, slice(start, start + n)))
        start += n
    return runs


def balanced_chunks(runs: list[tuple[int, slice]], parts: int) -> list[list[tuple[int, slice]]]:
    """Split consecutive runs into at most ``parts`` chunks of about equal total rows (a run goes
    to the chunk its middle row falls in); empty chunks are left out."""
    total = sum(sl.stop - sl.start for _, sl in runs)
    chunks: list[list[tuple[int, slice]]] = [[] for _ in range(parts)]
    done = 0
    for e, sl in runs:
        n = sl.stop - sl.start
        chunks[min(parts - 1, int((done + n / 2) * parts / max(total, 1)))].append((e, sl))
        done += n
    return [c for c in chunks if c]


def _pin_one_thread() -> None:
    # ATen lazily initialises each thread's count from the process default on the thread's first
    # parallel op, which would undo a plain set_num_threads(1): trigger that initialisation first
    torch.get_num_threads()
    torch.set_num_threads(1)


def _pool(workers: int) -> ThreadPoolExecutor:
    key = (os.getpid(), workers)
    pool = _pools.get(key)
    if pool is not None:
        return pool
    with _pools_lock:
        if key not in _pools:
            caller_threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(workers, thread_name_prefix="moekit-expert", initializer=_pin_one_thread)
            # start every worker now (so each pins itself before any work), then restore the
            # process-wide default the workers' set_num_threads(1) moved
            barrier = threading.Barrier(workers)
            for f in [pool.submit(barrier.wait) for _ in range(workers)]:
                f.result()
            torch.set_num_threads(caller_threads)
            _pools[key] = pool
    return _pools[key]


def use_expert_threads(counts: list[int], device: torch.device, macs_per_row: int,
                       threads: int | None = None) -> bool:
    """Whether :func:`for_each_expert` should spread experts over threads for this routing.

    ``macs_per_row``: multiply-adds of one row of one expert GEMM (d_model * d_hidden)."""
    threads = torch.get_num_threads() if threads is None else threads
    nonempty = sum(1 for n in counts if n)
    if device.type != "cpu" or threads < 2 or nonempty < MIN_RUNS_PER_THREAD * threads:
        return False
    mean_rows = sum(counts) / nonempty
    return mean_rows >= MIN_MEAN_ROWS and mean_rows * macs_per_row >= MIN_MACS_PER_EXPERT


def for_each_expert(counts: list[int], fn: Callable[[int, slice], None], device: torch.device,
                    parallel: bool) -> None:
    """Call ``fn(e, rows)`` for every non-empty expert; whole experts spread over the intra-op
    threads when ``parallel`` (decide with :func:`use_expert_threads`). ``fn`` must only fill preallocated
    outputs (it runs without autograd, inside an autograd.Function) and touch disjoint rows/experts.
    """
    runs = expert_runs(counts)
    threads = torch.get_num_threads()
    if not parallel or len(runs) < 2 or threads < 2:
        for e, sl in runs:
            fn(e, sl)
        return
    chunks = balanced_chunks(runs, threads)
    inference = torch.is_inference_mode_enabled()  # thread-local too: the outputs may be inference tensors

    def work(chunk: list[tuple[int, slice]]) -> None:
        with torch.inference_mode() if inference else torch.no_grad():  # grad mode is thread-local
            for e, sl in chunk:
                fn(e, sl)

    pool = _pool(threads)
    for f in [pool.submit(work, ch) for ch in chunks]:
        f.result()
