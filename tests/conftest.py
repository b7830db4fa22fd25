"""Suite-wide rule: a skipped or xfailed test fails the run.

Every test here must run on a fresh machine with the project's own install; a skip (a missing optional
import, a platform check) would turn a missing feature into a green CI, so it is counted as a failure.
"""
from __future__ import annotations

import pytest
import torch

NOT_RUN = ("skipped", "xfailed", "xpassed")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    counts = {k: len(reporter.stats.get(k, [])) for k in NOT_RUN}
    if any(counts.values()) and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        reporter.write_line(f"moekit: tests that did not run count as failures: {counts}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module's tests, restored after: on a shared 2-core machine torch's default
    threading is many times slower for tiny shapes, and bit-identity comparisons need the same thread count
    in every process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
