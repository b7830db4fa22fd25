"""One error convention for every command: ``moekit COMMAND: error: <one line>`` on stderr, exit code 2 for
a command line that cannot work (a bad flag, a value out of range, flags that conflict) and 1 for a run
that started and failed (a damaged file, a diverged run, a dead rank). Ctrl-C is exit 130 with one line;
a closed stdout (``moekit -h | head``) ends quietly. ``MOEKIT_TRACEBACK=1`` shows the traceback instead.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from moekit.rundir import CheckpointError, DamagedFileError

__all__ = ["RUNTIME", "USAGE", "UsageError", "guarded", "interrupts_kept", "print_error", "readable_run"]

USAGE, RUNTIME, INTERRUPTED = 2, 1, 130


class UsageError(ValueError):
    """A command line that cannot work: exit code 2."""


def print_error(prog: str, message: object) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)


@contextmanager
def interrupts_kept() -> Iterator[None]:
    """Inside, Ctrl-C raises KeyboardInterrupt as usual and is also remembered: leaving the block raises it
    again if it was swallowed on the way up (an exception raised inside a finalizer, or in a library's
    callback that ignores errors, is printed and dropped). For long set-up work before a command installs
    its own handler (the training loop's checkpoint-and-stop)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return
    seen: list[int] = []

    def handler(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if seen:
        raise KeyboardInterrupt


def readable_run(path, prog: str):
    """``path``, after writing the single-file weights of a run that holds only a distributed (DCP)
    checkpoint (moekit.parallel.run_export), so every command reads it like any other run."""
    from moekit.parallel.run_export import export_if_distributed

    note = export_if_distributed(path)
    if note:
        print(f"{prog}: {note}", file=sys.stderr)
    return path


def _code(e: BaseException) -> int:
    # a file that is there but cannot be decoded is a runtime failure, like one that cannot be read
    if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError, DamagedFileError)):
        return RUNTIME
    return USAGE if isinstance(e, ValueError) else RUNTIME


def guarded(prog: str, body: Callable[[], int]) -> int:
    """Run ``body()`` under the convention above; returns the exit code."""
    if os.environ.get("MOEKIT_TRACEBACK") == "1":
        return body()
    try:
        return body()
    except BrokenPipeError:
        # the reader went away: point stdout at /dev/null so the interpreter's final flush is silent too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return RUNTIME
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except (ValueError, OSError, CheckpointError) as e:
        print_error(prog, e)
        return _code(e)
