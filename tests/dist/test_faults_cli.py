"""`moekit train --nproc 2` (torchrun) when one rank hangs, is SIGKILLed or gets SIGTERM.

The fault is injected into one torchrun worker by tests/dist/_faults/sitecustomize.py (on PYTHONPATH,
driven by MOEKIT_TEST_FAULT): moekit's source holds no test hook.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from test_cli import TINY

FAULTS = Path(__file__).with_name("_faults")
TIMEOUT_S = 5  # --dist-timeout: how long a collective waits for a silent rank
SLACK_S = 25  # torchrun noticing the exit and tearing the workers down, on a loaded 2-core machine


def _run_dir(tmp_path: Path, tiny_data) -> Path:
    """A run directory whose data/ is already prepared (what `moekit train` would build: same request)."""
    out = tmp_path / "run"
    shutil.copytree(tiny_data.out_dir, out / "data")
    return out


def _moekit(*args: str, fault: str | None = None, fault_file: Path | None = None,
            timeout: float = 150) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MOEKIT_TEST_FAULT", None)
    if fault is not None:
        env.update(MOEKIT_TEST_FAULT=fault, MOEKIT_TEST_FAULT_FILE=str(fault_file or os.devnull),
                   PYTHONPATH=os.pathsep.join([str(FAULTS), *filter(None, [env.get("PYTHONPATH")])]))
    return subprocess.run([sys.executable, "-m", "moekit", "train", *args], check=False, capture_output=True,
                          text=True, timeout=timeout, env=env)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("moekit train: error:")]


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_hung_rank_fails_the_other_within_the_timeout(tmp_path, tiny_data) -> None:
    out, hung_at = _run_dir(tmp_path, tiny_data), tmp_path / "hung_at"
    p = _moekit("--nproc", "2", "--ep", "2", "--out", str(out), "--dist-timeout", str(TIMEOUT_S),
                *TINY, "--steps", "6", fault="hang:1:loss all-reduce:2", fault_file=hung_at)
    elapsed = time.time() - float(hung_at.read_text())
    assert p.returncode != 0
    errors = _errors(p.stderr)
    assert any(e.startswith("moekit train: error: rank 0: loss all-reduce failed: another rank exited or did "
                            f"not answer within the process-group timeout ({TIMEOUT_S} s)") for e in errors), \
        p.stderr[-3000:]
    assert elapsed < TIMEOUT_S + SLACK_S, (elapsed, p.stderr[-3000:])


def test_a_killed_rank_is_named_and_the_last_checkpoint_resumes(tmp_path, tiny_data) -> None:
    out = _run_dir(tmp_path, tiny_data)
    p = _moekit("--nproc", "2", "--ep", "2", "--out", str(out), "--dist-timeout", str(TIMEOUT_S),
                *TINY, "--steps", "6", "--ckpt-interval", "2", fault="kill:1:loss all-reduce:3")
    assert p.returncode != 0
    errors = [e for e in _errors(p.stderr) if "rank 0:" in e]
    assert len(errors) == 1 and "lost rank 1 (pid " in errors[0] and "exited or was killed" in errors[0], \
        p.stderr[-3000:]
    # the step-2 checkpoint is whole (its sha256 digests are checked by the load) and resumes with the
    # same two processes and, from a copy, on one process
    assert json.loads((out / "dcp" / "moekit.json").read_text())["step"] == 2
    assert not (out / "dcp.old").exists()
    alone = shutil.copytree(out, tmp_path / "alone")
    for run, nproc in ((out, ["--nproc", "2", "--dist-timeout", str(TIMEOUT_S)]), (alone, [])):
        p = _moekit("--resume", str(run), *nproc, "--steps", "4")
        assert p.returncode == 0, p.stderr[-3000:]
        assert _steps(run / "metrics.jsonl") == [1, 2, 3, 4]
        assert json.loads((run / "dcp" / "moekit.json").read_text())["step"] == 4


def test_sigterm_to_one_rank_checkpoints_the_same_step_on_all(tmp_path, tiny_data) -> None:
    out = _run_dir(tmp_path, tiny_data)
    p = _moekit("--nproc", "2", "--ep", "2", "--out", str(out), "--dist-timeout", str(TIMEOUT_S),
                *TINY, "--steps", "8", fault="term:1:loss all-reduce:3")
    assert p.returncode == 130, p.stderr[-3000:]  # as a one-process run stopped by a signal
    assert "interrupted; every rank checkpointed step 3" in p.stderr
    info = json.loads((out / "dcp" / "moekit.json").read_text())
    assert info["step"] == 3 and info["world_size"] == 2
    assert _steps(out / "metrics.jsonl")[-1] == 3
    assert _steps(out / "ranks" / "rank1" / "metrics.jsonl")[-1] == 3
