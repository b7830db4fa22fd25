"""Whole-expert threading: the partition of runs, the decision rule, and the caller's thread count."""
from __future__ import annotations

import threading

import torch

from moekit.ops.expert_threads import balanced_chunks, expert_runs, for_each_expert, use_expert_threads


def test_runs_skip_empty_experts_and_cover_all_rows():
    assert expert_runs([3, 0, 2, 0, 5]) == [(0, slice(0, 3)), (2, slice(3, 5)), (4, slice(5, 10))]


def test_balanced_chunks_keep_order_cover_every_run_and_balance_rows():
    counts = [250, 0, 260, 240, 255, 245, 270, 230, 0, 250]
    runs = expert_runs(counts)
    chunks = balanced_chunks(runs, 2)
    assert [r for c in chunks for r in c] == runs  # every run once, in order
    rows = [sum(sl.stop - sl.start for _, sl in c) for c in chunks]
    assert len(chunks) == 2 and abs(rows[0] - rows[1]) <= max(counts)
    # more parts than runs: no empty chunk
    assert balanced_chunks(expert_runs([5, 0, 7]), 4) == [[(0, slice(0, 5))], [(2, slice(5, 12))]]


def test_decision_rule():
    cpu = torch.device("cpu")
    b = [256] * 64  # bench shape B: 64 experts x 256 rows x (1024 x 512)
    assert use_expert_threads(b, cpu, 1024 * 512, threads=2)
    assert not use_expert_threads(b, cpu, 1024 * 512, threads=1)
    assert not use_expert_threads([512] * 8, cpu, 128 * 256, threads=2)  # tiny GEMMs: hand-off dominates
    assert not use_expert_threads([1, 1] + [0] * 6, cpu, 1024 * 3584, threads=2)  # decode: too few rows/runs
    assert not use_expert_threads(b, torch.device("meta"), 1024 * 512, threads=2)


def test_for_each_expert_parallel_visits_every_run_once_on_worker_threads_and_keeps_thread_count():
    torch.set_num_threads(2)
    counts = [40, 0, 30, 50, 20, 0, 60, 10, 25, 35]
    seen, names = [], set()
    lock = threading.Lock()

    def fn(e, sl):
        with lock:
            seen.append((e, sl))
            names.add(threading.current_thread().name)
            assert torch.get_num_threads() == 1  # workers run single-threaded GEMMs

    for_each_expert(counts, fn, torch.device("cpu"), parallel=True)
    assert sorted(seen, key=lambda r: r[0]) == expert_runs(counts)
    assert all(n.startswith("moekit-expert") for n in names)
    assert torch.get_num_threads() == 2  # the caller's intra-op threads are untouched
    seen.clear()
    for_each_expert(counts, lambda e, sl: seen.append((e, sl)), torch.device("cpu"), parallel=False)
    assert seen == expert_runs(counts)


def test_parallel_matmuls_equal_serial():
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    counts = [70, 0, 90, 65, 80, 75, 0, 85, 60, 95]
    x = torch.randn(sum(counts), 48, generator=g)
    w = torch.randn(len(counts), 32, 48, generator=g)
    outs = []
    for par in (False, True):
        y = torch.full((x.shape[0], 32), float("nan"))
        for_each_expert(counts, lambda e, sl: torch.mm(x[sl], w[e].t(), out=y[sl]), x.device, par)
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    assert not outs[1].isnan().any()
