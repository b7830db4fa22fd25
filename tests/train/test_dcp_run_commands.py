"""A run that holds only a distributed (DCP) checkpoint, as `moekit train --nproc N --ep E` leaves it, is
read directly by generate, inspect, report and convert: the first one writes its model.safetensors from
the checkpoint, a newer checkpoint is exported again, and the weights equal the checkpoint's."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from moekit.cli.train import main as train_main
from moekit.parallel.checkpoint import save_dcp
from moekit.rundir import RunDir


def _moekit(*args):
    return subprocess.run([sys.executable, "-m", "moekit", *map(str, args)], capture_output=True, text=True,
                          timeout=240)


def _to_dcp_only(run, step, scale=1.0):
    """Replace the run's one-process checkpoint by a DCP one of ``step`` (weights times ``scale``)."""
    model = RunDir(run).load_model()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    save_dcp(run / "dcp", model, info={"step": step})
    for name in ("model.safetensors", "train_state.pt", "trainer_state.json"):
        (run / name).unlink(missing_ok=True)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory, flags):
    run = tmp_path_factory.mktemp("dcp") / "run"
    assert train_main(flags(run, 2)) == 0
    return run, _to_dcp_only(run, 2)


def test_generate_inspect_report_convert_read_a_dcp_only_run(dcp_run, tmp_path):
    run, state = dcp_run
    res = _moekit("generate", run, "--max-new-tokens", "4", "--temperature", "0", "--threads", "1")
    assert res.returncode == 0, res.stderr
    assert f"holds a distributed checkpoint: wrote its model (step 2) to {run / 'model.safetensors'}" in res.stderr
    loaded = RunDir(run).load_model().state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    for args in (("inspect", run, "--tokens", "64", "--threads", "1"),
                 ("report", run, "--out", tmp_path / "report", "--spec-tokens", "0"),
                 ("convert", run, tmp_path / "hf")):
        res = _moekit(*args)
        assert res.returncode == 0, (args, res.stderr)
        assert "holds a distributed checkpoint" not in res.stderr  # exported once, reused
    assert (tmp_path / "report" / "report.html").is_file()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"]


def test_a_newer_dcp_checkpoint_is_exported_again(dcp_run, tmp_path, flags):
    run = tmp_path / "run"
    assert train_main(flags(run, 2)) == 0
    _to_dcp_only(run, 2)
    assert _moekit("generate", run, "--max-new-tokens", "1", "--threads", "1").returncode == 0
    model = RunDir(run).load_model()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    save_dcp(run / "dcp", model, info={"step": 3})  # a resumed distributed run checkpointed again
    res = _moekit("generate", run, "--max-new-tokens", "1", "--threads", "1")
    assert res.returncode == 0 and "wrote its model (step 3)" in res.stderr, res.stderr
    got = RunDir(run).load_model().state_dict()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
