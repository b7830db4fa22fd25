"""Atomic, verifiable checkpoints: safetensors weights + optimizer/RNG state + a JSON manifest.

Files in a run directory:
  model.safetensors   weights and buffers; metadata records the step
  train_state.pt      optimizer + RNG states (tensors and plain containers only; loaded weights_only)
  trainer_state.json  the commit point: step and the byte size of the two files above
A save 1. writes both files to ``.tmp`` names (fsync'ed), 2. atomically replaces the manifest, 3. renames
the ``.tmp`` files into place. A crash before 2 leaves the previous checkpoint whole; a crash after 2 is
rolled forward by ``load_checkpoint`` (the ``.tmp`` files of the manifest's step are renamed into place).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["CheckpointError", "atomic_write_bytes", "save_checkpoint", "load_checkpoint", "save_weights",
           "load_weights", "read_manifest"]

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
MANIFEST_FILE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or does not match the model."""


def _fsync_rename(tmp: Path, dst: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    try:
        dfd = os.open(dst.parent, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    except OSError:
        pass


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    _fsync_rename(tmp, path)


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=metadata or {})
    _fsync_rename(tmp, path)


def load_weights(model: nn.Module, path: Path, *, strict: bool = True) -> dict[str, str]:
    """Load safetensors weights into ``model``; errors name the file and the mismatching tensors."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors ({e}); the file is truncated or damaged") from e
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if wrong or (strict and (missing or unexpected)):
        raise CheckpointError(
            f"{path} does not match the model config: "
            + "; ".join(filter(None, [f"missing {missing[:5]}" if missing else "",
                                      f"unexpected {unexpected[:5]}" if unexpected else "",
                                      f"wrong shape {wrong[:5]}" if wrong else ""]))
            + ". Check that config.json belongs to these weights."
        )
    model.load_state_dict(tensors, strict=strict)
    return meta


def save_checkpoint(run_dir: Path, model: nn.Module, train_state: dict[str, Any], step: int) -> None:
    """Write weights and optimizer/RNG state, commit them with the manifest (see the module docstring)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    # renaming each file as it is written would destroy the previous checkpoint before the new manifest
    # exists (a SIGKILL there left files of two steps); the manifest is the commit point instead
    tmps = {name: run_dir / (name + ".tmp") for name in (MODEL_FILE, STATE_FILE)}
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmps[MODEL_FILE]),
              metadata={"step": str(step)})
    torch.save({"step": step, **train_state}, tmps[STATE_FILE])
    for tmp in tmps.values():
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    manifest = {"step": step, "files": {name: tmp.stat().st_size for name, tmp in tmps.items()}}
    atomic_write_bytes(run_dir / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())
    for name, tmp in tmps.items():
        _fsync_rename(tmp, run_dir / name)


def _file_step(path: Path) -> int | None:
    """The step recorded inside a checkpoint file (None if unreadable, e.g. a half-written .tmp)."""
    try:
        if path.name.startswith(MODEL_FILE):
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return int((f.metadata() or {}).get("step", -1))
        return int(torch.load(path, weights_only=True).get("step", -1))
    except Exception:  # noqa: BLE001 - any failure means "not a complete file of a known step"
        return None


def _roll_forward(run_dir: Path, manifest: dict[str, Any]) -> None:
    """Finish a save that was interrupted after its manifest was written (step 3 of save_checkpoint)."""
    for name in manifest["files"]:
        tmp = run_dir / (name + ".tmp")
        if tmp.is_file() and _file_step(tmp) == manifest["step"]:
            os.replace(tmp, run_dir / name)


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint manifest; is {run_dir} a moekit run directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: damaged manifest ({e})") from e


def load_checkpoint(run_dir: Path, model: nn.Module) -> dict[str, Any]:
    """Verify and load a checkpoint into ``model``; return the train state (optimizer, RNG, step)."""
    manifest = read_manifest(run_dir)
    _roll_forward(run_dir, manifest)
    for name, size in manifest["files"].items():
        p = run_dir / name
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (the manifest of step {manifest['step']} lists it)")
        if p.stat().st_size != size:
            raise CheckpointError(
                f"{p}: {p.stat().st_size} bytes but the manifest of step {manifest['step']} says {size}: "
                "the file is truncated or from another checkpoint"
            )
    meta = load_weights(model, run_dir / MODEL_FILE)
    try:
        state = torch.load(run_dir / STATE_FILE, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"{run_dir / STATE_FILE}: cannot load ({e})") from e
    steps = {"manifest": manifest["step"], MODEL_FILE: int(meta.get("step", -1)), STATE_FILE: state.get("step")}
    if len(set(steps.values())) != 1:
        raise CheckpointError(f"{run_dir}: checkpoint files disagree on the step {steps}; "
                              "the last save was interrupted — restore the files from one checkpoint")
    return state
