"""Whether a directory already holds a run (or a comparison of runs), and removing one for --overwrite.

Only the entries moekit writes are touched: a user's own files in the same directory stay.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from moekit.rundir.checkpoints import CHECKPOINTS_DIR
from moekit.rundir.files import (
    COMPARE_FILE,
    CONFIG_FILE,
    DATA_DIR,
    DCP_DIR,
    HF_CONFIG_FILE,
    INIT_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    MODEL_FILE,
    MODEL_INDEX_FILE,
    QUANT_FILE,
    RANKS_DIR,
    REPORT_DIR,
    STATE_FILE,
    SUMMARY_FILE,
    SWEEP_FILE,
    SWEEP_PLAN_FILE,
    TOKENIZER_FILE,
    TRAIN_CONFIG_FILE,
)

__all__ = ["COMPARE_SIDES", "holds_run", "remove_run"]

COMPARE_SIDES = ("moe", "dense")  # a comparison's two halves, each a run or one run per seed
# what marks a directory as a run: any of these files
_MARKERS = (CONFIG_FILE, TRAIN_CONFIG_FILE, METRICS_FILE, MANIFEST_FILE, MODEL_FILE, SUMMARY_FILE, COMPARE_FILE,
            SWEEP_FILE, SWEEP_PLAN_FILE)
_RUN_FILES = (*_MARKERS, HF_CONFIG_FILE, INIT_FILE, MODEL_INDEX_FILE, QUANT_FILE, STATE_FILE, TOKENIZER_FILE)
_RUN_DIRS = (CHECKPOINTS_DIR, DCP_DIR, DCP_DIR + ".old", RANKS_DIR, REPORT_DIR, DATA_DIR)


def holds_run(path: str | os.PathLike[str]) -> bool:
    """A run's files, a comparison's plan or summary, or a comparison half that holds a run."""
    path = Path(path)
    if any((path / name).exists() for name in _MARKERS):
        return True
    return any(holds_run(side) or any(holds_run(s) for s in side.glob("seed*"))
               for side in (path / n for n in COMPARE_SIDES) if side.is_dir())


def remove_run(path: str | os.PathLike[str]) -> list[Path]:
    """Remove what a run or a comparison wrote in ``path`` (and its interrupted writes' temporary files);
    returns what was removed. Anything else in the directory is left alone."""
    path = Path(path)
    removed = []
    for name in (*_RUN_FILES, *_RUN_DIRS, *COMPARE_SIDES):
        p = path / name
        if name in COMPARE_SIDES and p.is_dir():
            for run in [p, *sorted(p.glob("seed*"))]:
                removed += remove_run(run)
            _rmdir_if_empty(p)
        elif p.is_dir():
            shutil.rmtree(p)
            removed.append(p)
        elif p.exists():
            p.unlink()
            removed.append(p)
    for tmp in path.glob(".*.tmp-*"):
        tmp.unlink()
        removed.append(tmp)
    return removed


def _rmdir_if_empty(p: Path) -> None:
    try:
        p.rmdir()
    except OSError:
        pass  # the user keeps something of their own there
