"""moekit.runtime: the process settings the CLI applies, callable from Python too."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import moekit.runtime as rt


def test_configure_sets_threads_and_reports_them():
    before = torch.get_num_threads()
    try:
        s = rt.configure(threads=1)
        assert torch.get_num_threads() == 1 and s.threads == 1
        assert s.keep_freed_memory is (sys.platform.startswith("linux"))
        assert "1 threads" in s.describe()
    finally:
        torch.set_num_threads(before)


def test_bad_thread_count_is_refused():
    with pytest.raises(ValueError, match="threads=0 must be >= 1"):
        rt.configure(threads=0)


def test_import_changes_nothing_and_the_cli_applies_it():
    """No import-time side effect: a fresh process that imports moekit reports glibc's default."""
    code = "import moekit, moekit.runtime as r; print(r.settings().keep_freed_memory)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    code = "import moekit.runtime as r; r.configure(); print(r.settings().keep_freed_memory)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(sys.platform.startswith("linux"))


def test_decode_threads_one_per_32_mib_of_weights_within_the_cores():
    MiB = 1 << 20
    assert rt.decode_threads(6 * MiB, cores=2) == 1  # the default LM: overhead-bound, one thread
    assert rt.decode_threads(0, cores=8) == 1
    assert rt.decode_threads(64 * MiB, cores=8) == 2
    assert rt.decode_threads(95 * MiB, cores=8) == 2
    assert rt.decode_threads(10 << 30, cores=2) == 2  # never more than the cores
    assert 1 <= rt.decode_threads(10 << 30) <= (len(__import__("os").sched_getaffinity(0)))
