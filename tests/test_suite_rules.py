"""The suite's own rules, checked on a throwaway test tree: a skip fails the run."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")


def _run(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_x.py").write_text("import pytest\n\n" + body)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)


def test_a_skipped_test_fails_the_run(tmp_path):
    r = _run(tmp_path, "def test_ok():\n    assert True\n\ndef test_gone():\n    pytest.skip('optional')\n")
    assert r.returncode == 1, r.stdout
    assert "did not run count as failures" in r.stdout and "'skipped': 1" in r.stdout


def test_an_importorskip_fails_the_run(tmp_path):
    r = _run(tmp_path, "np = pytest.importorskip('no_such_module_here')\n\ndef test_a():\n    assert np\n")
    assert r.returncode == 1, r.stdout


def test_a_clean_run_passes(tmp_path):
    r = _run(tmp_path, "def test_ok():\n    assert 1 + 1 == 2\n")
    assert r.returncode == 0, r.stdout
