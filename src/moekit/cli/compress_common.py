"""What ``moekit quantize``, ``prune`` and ``upcycle`` share: loading the source run, the one-line error, saving."""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from moekit.cli.errors import UsageError, readable_run
from moekit.rundir import CheckpointError, RunDir, atomic_copy

__all__ = ["fail", "load_source", "run_command", "save_run"]


def fail(msg: str) -> None:
    raise UsageError(msg)


def load_source(path: str, out: str):
    """(RunDir, model) of the source run; refuses a missing run and an --out equal to it."""
    src = RunDir(readable_run(path, "moekit"))
    if not src.is_run():
        raise UsageError(f"{path}: not a moekit run directory (no config.json)")
    if Path(out).resolve() == src.path.resolve():
        raise UsageError(f"--out {out} is the source run; write the result elsewhere")
    return src, src.load_model()


def save_run(model, src: RunDir, out: RunDir) -> None:
    """A normal run directory: config.json, model.safetensors, and the source's tokenizer.json."""
    out.save_model(model)
    if src.tokenizer_path.is_file():
        atomic_copy(src.tokenizer_path, out.tokenizer_path)


def run_command(name: str, body: Callable[[], int]) -> int:
    """``body()``; a bad input is one line on stderr and exit code 2 (usage) or 1 (a run that cannot be read)."""
    try:
        return body()
    except UsageError as e:
        print(f"moekit {name}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"moekit {name}: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, OSError) as e:
        print(f"moekit {name}: error: {e}", file=sys.stderr)
        return 1
