"""`moekit train --compare --jobs 2`: a seed's MoE and dense runs train at the same time, each in a process
of its own, and give exactly the runs of training them one after the other; an interrupted pair resumes."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from moekit.cli.train import main

STEPS = 100


def _flags(flags, out, *extra):
    return flags(out, STEPS, "--compare", "--ckpt-interval", "2", "--eval-interval", "20", *extra)


@pytest.fixture(scope="module")
def one_after_the_other(tmp_path_factory, flags):
    out = tmp_path_factory.mktemp("seq") / "cmp"
    assert main(_flags(flags, out)) == 0
    return json.loads((out / "summary.json").read_text())


def _losses(summary):
    return {side: [r["final_val_loss"] for r in summary[side]["per_seed"]] for side in ("moe", "dense")}


def test_side_by_side_equals_one_after_the_other(tmp_path, flags, one_after_the_other, capfd):
    out = tmp_path / "pair"
    assert main([*_flags(flags, out), "--jobs", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["jobs"] == 2 and one_after_the_other["jobs"] == 1
    assert _losses(summary) == _losses(one_after_the_other)  # exact: the same threads, the same maths
    assert summary["moe_minus_dense_val_loss"] == one_after_the_other["moe_minus_dense_val_loss"]
    assert summary["moe"]["per_seed"][0]["tokens_per_s"] > 0 and "equal_time" in summary["moe"]["per_seed"][0]
    err = capfd.readouterr().err
    # the children print plain lines under their labels (no live display to overwrite the other's)
    assert f"[moe seed 0] step {STEPS}/{STEPS}" in err and f"[dense seed 0] step {STEPS}/{STEPS}" in err


def test_an_interrupted_pair_resumes_to_the_same_summary(tmp_path, flags, one_after_the_other):
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "moekit", "train", *_flags(flags, out), "--jobs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    states = [out / side / "trainer_state.json" for side in ("moe", "dense")]
    deadline = time.monotonic() + 240
    while not all(s.is_file() for s in states) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # to the parent only: it passes the signal on
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, log
    assert f"moekit train --compare --resume {out}" in log
    assert not (out / "summary.json").exists()
    moe_step = json.loads(states[0].read_text())["step"]
    assert 0 < moe_step < STEPS  # stopped part of the way, at a checkpoint (dense, faster, may be done)

    assert main(["--compare", "--resume", str(out), "--jobs", "2"]) == 0
    assert _losses(json.loads((out / "summary.json").read_text())) == _losses(one_after_the_other)


@pytest.mark.parametrize("extra,says", [(["--jobs", "2"], "it needs --compare"),
                                        (["--compare", "--jobs", "3"], "1 (one after the other) or 2")])
def test_bad_jobs_are_usage_errors(tmp_path, flags, capsys, extra, says):
    assert main([*flags(tmp_path / "x", 2), *extra]) == 2
    assert says in capsys.readouterr().err
