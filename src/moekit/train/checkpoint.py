"""Atomic, verifiable checkpoints: safetensors weights + optimizer/RNG state + a JSON manifest.

Files in a run directory (each written to a temp file, fsync'ed, then renamed):
  model.safetensors   weights and buffers; metadata records the step
  train_state.pt      optimizer + RNG states (tensors and plain containers only; loaded weights_only)
  trainer_state.json  written last: step and the byte size of the two files above
A crash between renames leaves files whose steps disagree; loading then names the mismatch.
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
    """Write weights, optimizer/RNG state and the manifest, each atomically; the manifest last."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model, run_dir / MODEL_FILE, {"step": str(step)})
    tmp = run_dir / (STATE_FILE + ".tmp")
    torch.save({"step": step, **train_state}, tmp)
    _fsync_rename(tmp, run_dir / STATE_FILE)
    manifest = {
        "step": step,
        "files": {name: (run_dir / name).stat().st_size for name in (MODEL_FILE, STATE_FILE)},
    }
    atomic_write_bytes(run_dir / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())


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
