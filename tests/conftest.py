"""Suite-wide hooks."""
from __future__ import annotations

import sys


def pytest_unconfigure(config):
    # the summary line ("N passed in T s") sits in stdout's buffer when output goes to a file or pipe;
    # flush it before interpreter shutdown, where worker pools and compile subprocesses are torn down
    sys.stdout.flush()
    sys.stderr.flush()
