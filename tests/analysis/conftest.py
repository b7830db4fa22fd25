"""Shared fixtures: a tiny Python corpus, and tiny MoE / dense runs trained for a few steps.

Layout mirrors ``moekit train --compare``: ROOT/data (prepared tokens), ROOT/moe, ROOT/dense.
"""
from __future__ import annotations

import sys
from pathlib import Path

# the suite runs with --import-mode=importlib, which puts no test directory on sys.path
sys.path.insert(0, str(Path(__file__).parent))

import pytest
from _analysis_runs import VOCAB, quiet_train, tiny_corpus, tiny_model, tiny_train

from moekit.data import DataInfo, prepare_data
from moekit.train.loop import TrainResult


@pytest.fixture(scope="session")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def tiny_data(root: Path) -> DataInfo:
    corpus = tiny_corpus(root / "corpus")
    return prepare_data(root / "data", corpus, vocab_size=VOCAB, max_bytes=None)


@pytest.fixture(scope="session")
def moe_run(root: Path, tiny_data: DataInfo) -> tuple[Path, TrainResult]:
    cfg = tiny_train(data=str(root / "corpus"), max_data_bytes=None)  # type: ignore[arg-type]
    res = quiet_train(tiny_model(tiny_data.vocab_size), cfg, root / "moe", tiny_data)
    return root / "moe", res


@pytest.fixture(scope="session")
def dense_run(root: Path, tiny_data: DataInfo) -> tuple[Path, TrainResult]:
    from moekit.train.compare import dense_baseline

    cfg = tiny_train(data=str(root / "corpus"), max_data_bytes=None)  # type: ignore[arg-type]
    res = quiet_train(dense_baseline(tiny_model(tiny_data.vocab_size)), cfg, root / "dense", tiny_data)
    return root / "dense", res
