"""Bytes and bits per weight of a run's weights file as stored (a quantized run's ``quantization.json``
says the format): read from the safetensors header alone: no tensor is loaded.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from moekit.rundir import QUANT_FILE, RunDir
from moekit.spec.count import count_params

__all__ = ["quant_summary", "stored_bytes"]

_PARTS = ("routed_experts", "shared_experts", "attention", "other")


def stored_bytes(path: str | Path) -> dict[str, int]:
    """Tensor name -> bytes it takes in a safetensors file (from the header's data offsets)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def _part(key: str) -> str:
    if ".ffn.experts." in key:
        return "routed_experts"
    if ".shared_experts." in key:
        return "shared_experts"
    return "attention" if ".attn." in key else "other"


def quant_summary(run: RunDir | str | Path) -> dict[str, Any]:
    """Per part: stored bytes, weights (from config.json) and bits per weight, scales included; the format."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    cfg = json.loads(run.config_path.read_text())
    comps = count_params(cfg).components
    weights = {"routed_experts": comps["routed_experts"].total, "shared_experts": comps["shared_experts"].total,
               "attention": comps["attention"].total}
    weights["other"] = sum(c.total for c in comps.values()) - sum(weights.values())
    nbytes = dict.fromkeys(_PARTS, 0)
    for k, b in stored_bytes(run.model_path).items():
        nbytes[_part(k)] += b
    qpath = run.path / QUANT_FILE
    out: dict[str, Any] = {"format": json.loads(qpath.read_text()) if qpath.is_file() else None,
                           "file_bytes": run.model_path.stat().st_size}
    for p in _PARTS:
        out[p] = {"bytes": nbytes[p], "weights": weights[p],
                  "bits_per_weight": 8 * nbytes[p] / weights[p] if weights[p] else 0.0}
    return out
