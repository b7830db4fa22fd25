"""Training checkpoints of a run directory: atomic, checksummed, the last N kept.

The latest checkpoint is the run directory's own ``model.safetensors`` + ``train_state.pt``, committed by
``trainer_state.json`` (the manifest: the step and each file's byte size and sha256). Older ones are kept
as ``checkpoints/step-<S>/`` (the same three files, hard links where the filesystem allows: no copy).

A save 1. writes both files to ``.tmp`` names (fsync'ed); 2. keeps the current checkpoint as
``checkpoints/step-<S>/``; 3. atomically replaces the manifest (the commit point); 4. renames the ``.tmp``
files into place; 5. drops kept checkpoints beyond ``keep``. A crash before 3 leaves the previous
checkpoint whole; a crash after 3 is rolled forward at load (the ``.tmp`` files whose digests the
manifest lists are renamed into place). A load verifies every file against the manifest and names the
file, both digests and the older checkpoint to resume from instead.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from moekit.rundir.files import (
    MANIFEST_FILE,
    MODEL_FILE,
    STATE_FILE,
    _commit,
    _write_synced,
    atomic_write_json,
)
from moekit.rundir.weights import CheckpointError, _state_tensors, load_weights

__all__ = ["CHECKPOINTS_DIR", "check_file", "file_digest", "kept_steps", "load", "promote", "read_manifest", "save"]

CHECKPOINTS_DIR = "checkpoints"
FILES = (MODEL_FILE, STATE_FILE)


def file_digest(path: Path) -> str:
    """sha256 of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _step_dir(run: Path, step: int) -> Path:
    return run / CHECKPOINTS_DIR / f"step-{step}"


def kept_steps(run: Path) -> list[int]:
    """Steps of the older checkpoints kept under checkpoints/, newest first."""
    root = run / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    steps = [int(p.name.removeprefix("step-")) for p in root.iterdir()
             if p.name.startswith("step-") and p.name.removeprefix("step-").isdigit() and (p / MANIFEST_FILE).is_file()]
    return sorted(steps, reverse=True)


def read_manifest(where: Path) -> dict[str, Any]:
    path = where / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint manifest; is {where} a moekit run directory?")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: damaged manifest ({e}){_older_hint(where, None)}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("step"), int) or \
            not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: not a checkpoint manifest (needs 'step' and 'files'){_older_hint(where, None)}")
    return manifest


def _run_of(where: Path) -> Path:
    return where.parent.parent if where.parent.name == CHECKPOINTS_DIR else where


def _older_hint(where: Path, step: int | None) -> str:
    run = _run_of(where)
    older = [s for s in kept_steps(run) if step is None or s < step]
    if not older:
        return ""
    return (f". The previous checkpoint (step {older[0]}) is kept in {_step_dir(run, older[0])}: resume from it "
            f"with moekit train --resume {run} --from-step {older[0]}")


def _keep_current(run: Path) -> None:
    """Step 2 of a save: the current checkpoint (if any, and whole) becomes checkpoints/step-<S>/."""
    try:
        manifest = read_manifest(run)
    except CheckpointError:
        return  # no checkpoint yet, or a damaged one: nothing worth keeping
    dst = _step_dir(run, manifest["step"])
    if dst.is_dir() or not all((run / n).is_file() for n in manifest["files"]):
        return
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in (*manifest["files"], MANIFEST_FILE):
        try:
            os.link(run / name, tmp / name)
        except OSError:  # no hard links here: copy
            shutil.copy2(run / name, tmp / name)
    _commit(tmp, dst)


def _prune(run: Path, keep: int) -> None:
    """Step 5: keep ``keep`` checkpoints in all, the latest (top level) included."""
    for step in kept_steps(run)[max(0, keep - 1):]:
        shutil.rmtree(_step_dir(run, step), ignore_errors=True)


def save(run: Path, model: nn.Module, train_state: dict[str, Any], step: int, keep: int = 2) -> None:
    """Write a checkpoint of ``step`` and commit it (module docstring); keep ``keep`` checkpoints in all."""
    if keep < 1:
        raise ValueError(f"keep_checkpoints={keep} must be >= 1")
    run.mkdir(parents=True, exist_ok=True)
    # renaming each file as it is written would destroy the previous checkpoint before the new manifest
    # exists (a SIGKILL there left files of two steps); the manifest is the commit point instead
    tmps = {name: run / (name + ".tmp") for name in FILES}
    _write_synced(tmps[MODEL_FILE], lambda tmp: save_file(_state_tensors(model), str(tmp), metadata={"step": str(step)}))
    _write_synced(tmps[STATE_FILE], lambda tmp: torch.save({"step": step, **train_state}, tmp))
    if keep > 1:
        _keep_current(run)
    files = {name: {"bytes": tmp.stat().st_size, "sha256": file_digest(tmp)} for name, tmp in tmps.items()}
    atomic_write_json(run / MANIFEST_FILE, {"step": step, "files": files})
    for name, tmp in tmps.items():
        _commit(tmp, run / name)
    _prune(run, keep)


def _expected(entry: Any) -> tuple[int | None, str | None]:
    """(bytes, sha256) of a manifest entry; manifests written before checksums hold the size only."""
    if isinstance(entry, dict):
        return entry.get("bytes"), entry.get("sha256")
    return entry, None


def _roll_forward(where: Path, manifest: dict[str, Any]) -> None:
    """Finish a save interrupted after its manifest was written (step 4)."""
    for name, entry in manifest["files"].items():
        tmp = where / (name + ".tmp")
        size, digest = _expected(entry)
        if tmp.is_file() and tmp.stat().st_size == size and (digest is None or file_digest(tmp) == digest):
            _commit(tmp, where / name)


def check_file(where: Path, manifest: dict[str, Any], name: str, *, digest: bool = True) -> None:
    """The file ``name`` is there with the manifest's size (and, with ``digest``, its sha256); CheckpointError
    names the file, what differs, and the older checkpoint to resume from instead."""
    step = manifest["step"]
    p = where / name
    size, sha = _expected(manifest["files"][name])
    if not p.is_file():
        raise CheckpointError(f"{p}: missing (the manifest of step {step} lists it){_older_hint(where, step)}")
    if size is not None and p.stat().st_size != size:
        raise CheckpointError(f"{p}: {p.stat().st_size} bytes but the manifest of step {step} says {size}: "
                              f"the file is truncated or from another checkpoint{_older_hint(where, step)}")
    if digest and sha is not None and (actual := file_digest(p)) != sha:
        raise CheckpointError(f"{p}: sha256 {actual} but the manifest of step {step} says {sha}: the file "
                              f"is damaged or from another checkpoint{_older_hint(where, step)}")


def verify(where: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is there with its size and sha256."""
    for name in manifest["files"]:
        check_file(where, manifest, name)


def _where(run: Path, step: int | None) -> Path:
    if step is None:
        return run
    if (run / MANIFEST_FILE).is_file():
        try:
            if read_manifest(run)["step"] == step:
                return run
        except CheckpointError:
            pass
    if step not in kept_steps(run):
        kept = kept_steps(run)
        raise CheckpointError(f"{run}: no checkpoint of step {step} is kept"
                              + (f"; kept: steps {kept}" if kept else "; only the latest is there"))
    return _step_dir(run, step)


def load(run: Path, model: nn.Module, step: int | None = None) -> dict[str, Any]:
    """Verify and load the latest checkpoint (or the kept one of ``step``) into ``model``; return the train
    state (optimizer, RNG, step)."""
    where = _where(run, step)
    manifest = read_manifest(where)
    _roll_forward(where, manifest)
    verify(where, manifest)
    meta = load_weights(model, where / MODEL_FILE)
    try:
        state = torch.load(where / STATE_FILE, weights_only=True)
    except Exception as e:  # any unpickling failure means a damaged file
        raise CheckpointError(f"{where / STATE_FILE}: cannot load ({e})") from e
    steps = {"manifest": manifest["step"], MODEL_FILE: int(meta.get("step", -1)), STATE_FILE: state.get("step")}
    if len(set(steps.values())) != 1:
        raise CheckpointError(f"{where}: checkpoint files disagree on the step {steps}; "
                              "the last save was interrupted — restore the files from one checkpoint")
    return state


def promote(run: Path, step: int) -> None:
    """Make the kept checkpoint of ``step`` the latest again (``--from-step``): the newer ones are not
    deleted but moved to ``checkpoints/rejected-step-<S>/``, so nothing is lost."""
    src = _where(run, step)
    if src == run:
        return
    rejected = run / CHECKPOINTS_DIR / "rejected-step-{}"
    newer = [s for s in kept_steps(run) if s > step]
    for s in newer:
        os.replace(_step_dir(run, s), Path(str(rejected).format(s)))
    # the top-level files (the newest checkpoint, damaged or not) are moved aside as they are
    try:
        top = read_manifest(run)["step"]
    except CheckpointError:
        top = "unknown"
    aside = Path(str(rejected).format(top))
    aside.mkdir(parents=True, exist_ok=True)
    for name in (*FILES, MANIFEST_FILE):
        if (run / name).is_file():
            os.replace(run / name, aside / name)
    for name in (*FILES, MANIFEST_FILE):
        shutil.copy2(src / name, run / (name + ".tmp"))
    for name in (*FILES, MANIFEST_FILE):  # the manifest last: the commit point
        _commit(run / (name + ".tmp"), run / name)
    shutil.rmtree(src)
