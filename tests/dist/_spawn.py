"""Run a function on W spawned CPU processes joined by a gloo process group; collect their results.

Each rank's return value (or its traceback) is written with torch.save to ``<tmp>/rank<r>.pt``. A rank
that neither finishes nor fails within ``timeout`` is killed and reported, so a hang fails the test
instead of blocking the suite. Workers live in importable modules (spawn pickles them by name).
"""
from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, fn: Callable, args: tuple, timeout_s: float,
           init: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # W processes share 2 cores
    result: dict[str, Any]
    try:
        if init:
            from moekit.parallel import init_distributed

            init_distributed("gloo", rank, world, timeout_s=timeout_s)
        result = {"ok": True, "value": fn(rank, world, *args)}
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    finally:
        if init:
            from moekit.parallel.groups import destroy

            with contextlib.suppress(Exception):  # the group may be broken on purpose
                destroy()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def run(fn: Callable, world: int, *args: Any, timeout: float = 90.0, pg_timeout: float = 30.0,
        init: bool = True, check: bool = True) -> list[dict[str, Any]]:
    """fn(rank, world, *args) on ``world`` processes; returns each rank's {"ok", "value" | "error"}."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_entry, args=(r, world, port, out_dir, fn, args, pg_timeout, init))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        results = []
        for r in range(world):
            f = Path(out_dir) / f"rank{r}.pt"
            if f.is_file():
                results.append(torch.load(f, weights_only=False))
            else:
                results.append({"ok": False, "error": "hung (killed)" if r in hung else
                                f"exited with code {procs[r].exitcode} without a result"})
    if check:
        bad = [(r, res) for r, res in enumerate(results) if not res["ok"]]
        if bad:
            raise AssertionError("\n".join(f"rank {r}: {res['error']}\n{res.get('traceback', '')}" for r, res in bad))
    return results
