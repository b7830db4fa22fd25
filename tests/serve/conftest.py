"""Fixtures: one tiny trained run (and a copy with a chat template), and live servers over it."""
from __future__ import annotations

import sys
from pathlib import Path

# the suite runs with --import-mode=importlib, which puts no test directory on sys.path
sys.path.insert(0, str(Path(__file__).parent))

import pytest
from _serve_helpers import LiveServer, Poisoned, train_tiny_run, with_chat_template

from moekit.infer.load import load_for_inference


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one CPU thread (the one_thread fixture of tests/conftest.py)."""


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="session")
def chat_dir(run_dir, tmp_path_factory) -> Path:
    return with_chat_template(run_dir, tmp_path_factory.mktemp("chat") / "run")


@pytest.fixture(scope="session")
def model_tok(run_dir):
    return load_for_inference(run_dir)


def make_loader(model_tok, path: Path, **engine_kw):
    """load(metrics) -> Loaded: the CLI's start_engine over the shared model wrapped in Poisoned."""
    from moekit.serve.cli import start_engine

    model, tok = model_tok
    return lambda metrics: start_engine(Poisoned(model), tok, str(path), metrics, **engine_kw)


@pytest.fixture(scope="module")
def live(model_tok, chat_dir):
    """A server (batched, max batch 4) over the run with a chat template."""
    srv = LiveServer(make_loader(model_tok, chat_dir, max_batch=4))
    srv.wait_ready()
    yield srv
    srv.stop()
