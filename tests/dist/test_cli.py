"""`moekit train --nproc 2 --ep 2` (torchrun underneath) trains, then resumes on one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

TINY = ["--steps", "3", "--batch-size", "4", "--seq-len", "16", "--d-model", "16", "--n-heads", "2",
        "--n-layers", "1", "--experts", "4", "--expert-hidden", "16", "--max-data-bytes", "100000",
        "--vocab-size", "300", "--eval-interval", "3", "--eval-batches", "1", "--warmup-steps", "1",
        "--ckpt-interval", "100"]


def _moekit(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "moekit", "train", *args], check=False, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_cli_nproc_ep_then_resume_on_one_process(tmp_path) -> None:
    out = tmp_path / "run"
    p = _moekit("--nproc", "2", "--ep", "2", "--out", str(out), *TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "dcp" / ".metadata").is_file() and not (out / "model.safetensors").exists()
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and all(r["a2a_bytes_sent"] > 0 for r in recs)
    # the ep=2 run goes on in one process, from the DCP checkpoint (experts gathered back)
    p = _moekit("--resume", str(out), "--steps", "4")
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert json.loads((out / "dcp" / "moekit.json").read_text())["step"] == 4


def test_cli_ep_without_processes_is_an_error(tmp_path, capsys, monkeypatch) -> None:
    from moekit.cli.train import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--ep", "2", "--out", str(tmp_path / "r"), *TINY]) == 1
    assert "--ep 2 needs a multiple of 2 processes" in capsys.readouterr().err
