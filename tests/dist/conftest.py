"""Session fixtures that spawn the gloo worlds once: starting processes dominates the run time."""
from __future__ import annotations

import sys
from pathlib import Path

# the workers must be importable by name in the spawned processes (which inherit sys.path), and the
# suite runs with --import-mode=importlib, which puts no test directory on sys.path
sys.path.insert(0, str(Path(__file__).parent))

import _run_workers
import _spawn
import pytest


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from moekit.data import prepare_data

    return prepare_data(tmp_path_factory.mktemp("data"), vocab_size=300, max_bytes=100_000)


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt") / "dcp"


@pytest.fixture(scope="session")
def world4(tiny_data, ckpt_dir, tmp_path_factory) -> dict:
    """4 ranks: layer parity (EP over 4), error cases, ep=2 x dp=2 training, a checkpoint saved with ep=4."""
    run_dir = tmp_path_factory.mktemp("run_ep2dp2")
    res = _spawn.run(_run_workers.world4, 4, tiny_data, str(run_dir), str(ckpt_dir), timeout=240)
    return {"ranks": [r["value"] for r in res], "run_dir": run_dir}


@pytest.fixture(scope="session")
def world2(world4, ckpt_dir) -> dict:
    """2 ranks: layer parity (EP over 2), the ep=4 checkpoint loaded with ep=2."""
    res = _spawn.run(_run_workers.world2, 2, str(ckpt_dir), timeout=180)
    return {"ranks": [r["value"] for r in res]}


@pytest.fixture(scope="session")
def resume_world4(tiny_data, tmp_path_factory) -> dict:
    """4 ranks: setup errors, 2N steps at ep=2 x dp=2, N steps + SIGTERM, resumes at ep=4 / ep=1 / no optimizer."""
    import _resume_workers

    base = tmp_path_factory.mktemp("resume")
    res = _spawn.run(_resume_workers.resume_world4, 4, tiny_data, str(base), timeout=240)
    return {"ranks": [r["value"] for r in res], "base": base}
