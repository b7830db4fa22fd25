"""Run-directory file names and the one atomic write (temp file, fsync, rename, fsync the directory).

Imports nothing of moekit, so every package (data and hf too) writes its files through it.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "COMPARE_FILE",
    "CONFIG_FILE",
    "DATA_DIR",
    "DCP_DIR",
    "HF_CONFIG_FILE",
    "INIT_FILE",
    "MANIFEST_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "MODEL_INDEX_FILE",
    "QUANT_FILE",
    "RANKS_DIR",
    "REPORT_DIR",
    "STATE_FILE",
    "SUMMARY_FILE",
    "SWEEP_FILE",
    "SWEEP_PLAN_FILE",
    "TOKENIZER_FILE",
    "TRAIN_CONFIG_FILE",
    "DamagedFileError",
    "atomic_copy",
    "atomic_write",
    "atomic_write_json",
]

CONFIG_FILE = "config.json"
TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
TOKENIZER_FILE = "tokenizer.json"
MODEL_FILE = "model.safetensors"
MODEL_INDEX_FILE = "model.safetensors.index.json"  # the weights in shards instead (e.g. `moekit new`)
QUANT_FILE = "quantization.json"  # the weights are quantized (moekit quantize): their format
STATE_FILE = "train_state.pt"
MANIFEST_FILE = "trainer_state.json"
DCP_DIR = "dcp"
HF_CONFIG_FILE = "hf_config.json"
INIT_FILE = "init_from.json"
DATA_DIR = "data"
RANKS_DIR = "ranks"
SUMMARY_FILE = "summary.json"  # a comparison's result (moekit train --compare)
COMPARE_FILE = "compare.json"  # a comparison's plan and the rows of its finished runs (for --resume)
REPORT_DIR = "report"
SWEEP_FILE = "sweep.json"  # moekit sweep: per expert count, the runs' losses, params, speed, speedup
SWEEP_PLAN_FILE = "sweep_plan.json"  # what a sweep trains (a second invocation must match it)


class DamagedFileError(ValueError):
    """A file is there but cannot be decoded (invalid JSON, a truncated tokenizer, ...): a runtime failure
    (exit code 1), named with the file and what to do."""


Data = bytes | str | Callable[[Path], Any]  # a writer is called with the temporary path to write


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_synced(tmp: Path, data: Data) -> None:
    """Steps 1 and 2: write ``data`` to ``tmp``, fsync it. The file gets the mode a plain ``open`` would
    (0666 less the umask): some writers (safetensors) create private 0600 files."""
    if callable(data):
        data(tmp)
    else:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.chmod(tmp, 0o666 & ~_umask())
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())


def _commit(tmp: Path, dst: Path) -> None:
    """Steps 3 and 4: rename ``tmp`` over ``dst``, fsync the directory so the rename survives a power cut."""
    os.replace(tmp, dst)
    try:
        fd = os.open(dst.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: Data) -> Path:
    """Replace ``path`` by ``data`` (bytes, text, or ``writer(tmp_path)``) atomically; returns the path.

    The temporary name ``.<name>.tmp-<pid>`` is unique per process and removed if the write fails.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_synced(tmp, data)
        _commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, sort_keys: bool = False) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
