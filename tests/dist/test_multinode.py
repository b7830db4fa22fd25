"""Two "nodes" on 127.0.0.1: two `moekit train --nnodes 2 --node-rank R --rdzv-endpoint` invocations, each
its own torchrun with one process, joined by the c10d rendezvous (the path two machines take)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from _spawn import free_port
from test_cli import TINY


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "moekit", "train", *args, *TINY]


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_nodes_on_loopback_train_like_one_process(tmp_path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run, ref = tmp_path / "run", tmp_path / "ref"
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen(_cmd("--nproc", "1", "--nnodes", "2", "--node-rank", str(r), "--rdzv-endpoint",
                                   endpoint, "--ep", "2", "--out", str(run)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    # the one-process reference runs meanwhile
    single = subprocess.Popen(_cmd("--out", str(ref)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)
    outs = [p.communicate(timeout=180) for p in nodes]
    for r, (p, (_, err)) in enumerate(zip(nodes, outs)):
        assert p.returncode == 0, f"node {r}: {err[-3000:]}"
        assert f"--nnodes=2 --node-rank={r}" in err and "--rdzv-backend=c10d" in err
    assert (run / "dcp" / ".metadata").is_file() and (run / "ranks" / "rank1" / "metrics.jsonl").is_file()
    _, err = single.communicate(timeout=180)
    assert single.returncode == 0, err[-3000:]
    got, want = _losses(run), _losses(ref)
    assert len(got) == len(want) == 3
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(got, want)), (got, want)
