"""The last N distributed checkpoints of a run: the keep-N and --from-step rules of the single-file ones.

The latest DCP checkpoint is ``<run>/dcp``; a save moves the previous one (whole, its digests in its
``moekit.json``) to ``<run>/checkpoints/dcp-step-<S>/`` instead of deleting it, and drops the kept ones
beyond ``keep`` in all. Resuming from a kept step (``--from-step S``) makes it the latest again; the newer
ones are moved aside to ``checkpoints/rejected-dcp-step-<S>/``, never deleted. Rank 0 alone moves
directories (the filesystem is shared); the caller puts the barriers around it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from moekit.rundir.checkpoints import CHECKPOINTS_DIR

__all__ = ["kept_dcp_dir", "kept_dcp_steps", "older_hint", "promote_dcp", "retire_previous"]

_PREFIX = "dcp-step-"
_INFO = "moekit.json"  # written by checkpoint.save_dcp: step, layout, digests


def _root(dcp: Path) -> Path:
    return Path(dcp).parent / CHECKPOINTS_DIR


def kept_dcp_dir(dcp: Path, step: int) -> Path:
    return _root(dcp) / f"{_PREFIX}{step}"


def kept_dcp_steps(dcp: Path) -> list[int]:
    """Steps of the older DCP checkpoints kept beside ``dcp``, newest first."""
    root = _root(dcp)
    if not root.is_dir():
        return []
    steps = [int(p.name.removeprefix(_PREFIX)) for p in root.iterdir()
             if p.name.startswith(_PREFIX) and p.name.removeprefix(_PREFIX).isdigit() and (p / ".metadata").is_file()]
    return sorted(steps, reverse=True)


def _step_of(d: Path) -> int | None:
    try:
        return json.loads((d / _INFO).read_text()).get("step")
    except (OSError, json.JSONDecodeError):
        return None


def retire_previous(dcp: Path, previous: Path, keep: int) -> None:
    """After a save: keep the ``previous`` checkpoint under checkpoints/ if ``keep`` > 1 (else delete it),
    then drop kept ones beyond ``keep`` in all (the latest, ``dcp``, included)."""
    step = _step_of(previous) if (previous / ".metadata").is_file() else None
    if keep > 1 and step is not None:
        dst = kept_dcp_dir(dcp, step)
        if dst.exists():  # a step saved twice (a resume from an earlier step): the newer copy wins
            shutil.rmtree(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(previous, dst)
    else:
        shutil.rmtree(previous)
    for s in kept_dcp_steps(dcp)[max(0, keep - 1):]:
        shutil.rmtree(kept_dcp_dir(dcp, s), ignore_errors=True)


def promote_dcp(dcp: Path, step: int) -> None:
    """Make the kept checkpoint of ``step`` the latest: newer kept ones and the current ``dcp`` go aside."""
    src = kept_dcp_dir(dcp, step)
    for s in [s for s in kept_dcp_steps(dcp) if s > step]:
        os.replace(kept_dcp_dir(dcp, s), _root(dcp) / f"rejected-{_PREFIX}{s}")
    if dcp.exists():
        aside = _root(dcp) / f"rejected-{_PREFIX}{_step_of(dcp) if _step_of(dcp) is not None else 'unknown'}"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(dcp, aside)
    os.replace(src, dcp)


def older_hint(dcp: Path, run: Path) -> str:
    """How to resume from the newest kept checkpoint, or "" when none is kept."""
    older = kept_dcp_steps(dcp)
    if not older:
        return ""
    return (f"; the previous checkpoint (step {older[0]}) is kept in {kept_dcp_dir(dcp, older[0])}: resume "
            f"from it with moekit train --resume {run} --from-step {older[0]}")
