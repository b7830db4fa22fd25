"""Reading and writing Hugging Face checkpoint directories: config.json and (sharded) safetensors.

Reading never holds a second copy of the weights: tensors are read one at a time through
``safetensors.safe_open`` (memory-mapped). The mapped pages a read touches count towards the process's
resident set until the file is closed, so :class:`ShardReader` closes and reopens a file every
``reopen_bytes`` read, which bounds that overhead whatever the shard size.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moekit.rundir import MODEL_FILE, MODEL_INDEX_FILE, atomic_write, atomic_write_json
from moekit.rundir.shards import _ST_DTYPES, ShardReader  # noqa: F401 - re-exported for the adapters

__all__ = [
    "CONFIG_FILE",
    "INDEX_FILE",
    "SINGLE_FILE",
    "ShardReader",
    "parse_dtype",
    "parse_size",
    "read_json",
    "write_shards",
]

CONFIG_FILE = "config.json"
INDEX_FILE = MODEL_INDEX_FILE
SINGLE_FILE = MODEL_FILE

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None/"auto" -> None (keep the checkpoint's dtype); a torch dtype or its name -> that dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    name = dtype.removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise ValueError(f"dtype={dtype!r} is not supported; use float32, bfloat16 or float16")
    return _DTYPE_NAMES[name]


def parse_size(size: int | str) -> int:
    """Bytes of ``5GB``, ``500MB``, ``100KiB``, or an int."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r} is not a size like '5GB' or '200MB'")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


def write_shards(
    entries: Iterable[tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]],
    out: Path,
    max_shard_size: int | str = "5GB",
) -> list[Path]:
    """Write (key, shape, dtype, make_tensor) entries as HF safetensors shards (+ index when > 1).

    Tensors are produced one shard at a time, so saving holds at most one shard beyond the model.
    """
    limit = parse_size(max_shard_size)
    entries = list(entries)
    shards: list[list] = [[]]
    size = 0
    total = 0
    for e in entries:
        n = torch.Size(e[1]).numel() * e[2].itemsize
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
        total += n
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / SINGLE_FILE, out / INDEX_FILE, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for name, shard in zip(names, shards):
        tensors = {}
        for key, shape, dtype, make in shard:
            t = make().detach().contiguous()
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise AssertionError(f"{key}: planned {shape} {dtype}, produced {tuple(t.shape)} {t.dtype}")
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()  # a slice of a stacked tensor: safetensors refuses tensors sharing storage
            tensors[key] = t
            weight_map[key] = name
        atomic_write(out / name, lambda tmp, t=tensors: save_file(t, str(tmp), metadata={"format": "pt"}))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_json(out / INDEX_FILE, index, sort_keys=True)
    return [out / n for n in names]
