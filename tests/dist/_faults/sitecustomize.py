"""Test-only fault injection for `moekit train --nproc` runs (tests/dist/test_faults_cli.py).

Put this directory on PYTHONPATH and set MOEKIT_TEST_FAULT="<action>:<rank>:<collective>:<n>"; the
torchrun worker whose RANK is <rank> does <action> at its n-th call of the moekit collective named
<collective> (the ``what`` of moekit.parallel.groups.collective, e.g. "loss all-reduce"):

  hang   record the time in $MOEKIT_TEST_FAULT_FILE, then never return (SIGTERM kills it, as torchrun's
         clean-up expects of a stuck process)
  kill   SIGKILL itself
  term   SIGTERM itself (the run's handler asks every rank to checkpoint and stop), then go on

Nothing happens in other processes (the launcher, torchrun's agent, other ranks): moekit's source
holds no test hook.
"""
import os

_SPEC = os.environ.get("MOEKIT_TEST_FAULT", "")
if _SPEC and os.environ.get("RANK") == _SPEC.split(":")[1]:
    import signal
    import time

    import moekit.parallel.groups as _groups

    _action, _rank, _what, _n = _SPEC.split(":")
    _seen = {"calls": 0}
    _collective = _groups.collective

    def _faulty(what, fn, group=None):
        if what == _what:
            _seen["calls"] += 1
            if _seen["calls"] == int(_n):
                if _action == "hang":
                    with open(os.environ["MOEKIT_TEST_FAULT_FILE"], "w") as f:
                        f.write(str(time.time()))
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    while True:
                        time.sleep(1)
                elif _action == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                elif _action == "term":
                    os.kill(os.getpid(), signal.SIGTERM)
        return _collective(what, fn, group)

    # functions of groups.py look `collective` up at call time (all_reduce_, barrier, ...)
    _groups.collective = _faulty
