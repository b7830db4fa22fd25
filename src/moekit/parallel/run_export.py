"""Runs trained on several processes checkpoint to DCP only; the commands that read a model (generate,
inspect, report, convert, serve, quantize, ...) take them directly: the first use writes the run's
``model.safetensors`` from its distributed checkpoint (once per checkpoint step: a later, resumed DCP
checkpoint is exported again)."""
from __future__ import annotations

from pathlib import Path

from moekit.rundir import RunDir

__all__ = ["export_if_distributed"]

_SOURCE = "moekit-dcp"


def _exported_step(weights: Path) -> int | None:
    """The DCP step a model.safetensors was exported from, or None for weights saved any other way."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # a damaged file: loading it reports the damage with the file's name
        return None
    return int(meta["step"]) if meta.get("source") == _SOURCE and "step" in meta else None


def export_if_distributed(path: str | Path) -> str | None:
    """Write ``path``'s model.safetensors from its DCP checkpoint when that is all it has, or when the
    DCP checkpoint is newer than an earlier export; returns a line saying so (None when nothing was
    written). Anything else is left to the loader."""
    from moekit.parallel.checkpoint import export_dcp_to_safetensors, read_dcp_info, resolve_dcp_dir

    run = RunDir(path)
    if not (run.is_run() and run.has_dcp()):
        return None
    step = read_dcp_info(run.dcp_dir).get("step")
    if run.model_path.is_file():
        done = _exported_step(run.model_path)
        if done is None or done == step:
            return None  # the weights of a one-process checkpoint, or this very export
    export_dcp_to_safetensors(resolve_dcp_dir(run.dcp_dir), run.model_path)
    return f"{run.path} holds a distributed checkpoint: wrote its model (step {step}) to {run.model_path}"
