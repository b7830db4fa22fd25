"""Distributed checkpoints keep the last N (--keep-checkpoints) and resume from a kept one (--from-step);
the file moves are rank 0's alone, so one process (DistributedRuntime without groups) exercises them."""
from __future__ import annotations

import json
import math

import pytest
from _run_workers import train_configs

from moekit.rundir import CheckpointError
from moekit.train.distributed import DistributedRuntime
from moekit.train.loop import train


def _losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_keep_n_and_from_step(tiny_data, tmp_path) -> None:
    mcfg, tcfg = train_configs()
    tcfg = tcfg.replace(steps=6, ckpt_interval=2, keep_checkpoints=2, eval_interval=100)
    run = tmp_path / "run"
    train(mcfg, tcfg, run, tiny_data, runtime=DistributedRuntime(None, run), label="keep")
    full = _losses(run)
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["dcp-step-4"]  # step 2 dropped: 2 kept in all, the latest (dcp, step 6) included
    assert json.loads((run / "dcp" / "moekit.json").read_text())["step"] == 6
    with pytest.raises(ValueError, match=r"--from-step 2: no kept distributed checkpoint .*kept steps: \[4\]"):
        train(mcfg, tcfg, run, tiny_data, resume=True, from_step=2, runtime=DistributedRuntime(None, run))
    # a flipped byte in the latest: the error names the kept one to resume from
    shard = next((run / "dcp").glob("*.distcp"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"previous checkpoint \(step 4\) .* --from-step 4"):
        train(mcfg, tcfg, run, tiny_data, resume=True, runtime=DistributedRuntime(None, run))
    train(mcfg, tcfg, run, tiny_data, resume=True, from_step=4, runtime=DistributedRuntime(None, run))
    again = _losses(run)
    assert sorted(again) == [1, 2, 3, 4, 5, 6]
    assert all(math.isclose(again[s], full[s], rel_tol=1e-6) for s in (5, 6)), (again, full)
    # the damaged step-6 checkpoint was moved aside, not deleted; step 6 is the latest again
    assert (run / "checkpoints" / "rejected-dcp-step-6" / ".metadata").is_file()
    assert json.loads((run / "dcp" / "moekit.json").read_text())["step"] == 6
