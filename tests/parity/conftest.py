"""Parity-test fixtures: one intra-op thread, and the measured logit differences printed at the end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# the suite runs with --import-mode=importlib, which puts no test directory on sys.path: the test
# modules import their shared checks (_hf_parity) by name
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: OpenMP fan-out only costs (badly so on a shared 2-core machine)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    try:
        from _hf_parity import RESULTS
    except ImportError:
        return
    if RESULTS:
        terminalreporter.write_sep("-", "max |logit diff| moekit vs transformers")
        for name, d in sorted(RESULTS.items()):
            terminalreporter.write_line(f"{name:48s} {d:.2e}")
