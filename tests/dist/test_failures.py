"""A rank that dies makes the others fail fast with a clear message instead of hanging."""
from __future__ import annotations

import _run_workers
import _spawn


def test_rank_that_exits_early_fails_the_others_with_a_message() -> None:
    res = _spawn.run(_run_workers.dies_early, 2, pg_timeout=20, timeout=90, check=False)
    assert not res[1]["ok"] and "exited with code 3" in res[1]["error"]
    assert res[0]["ok"], res[0]
    msg = res[0]["value"]
    assert "CollectiveError" in msg and "rank 0: expert-parallel all-to-all failed" in msg, msg
    assert "lost rank 1 (pid " in msg and "its process exited or was killed" in msg, msg
    assert float(msg.split("s ", 1)[0]) < 20, msg  # the dead peer is noticed before the timeout
