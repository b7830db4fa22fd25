"""Reading and writing Hugging Face checkpoint directories: config.json and (sharded) safetensors.

Reading never holds a second copy of the weights: tensors are read one at a time through
``safetensors.safe_open`` (memory-mapped). The mapped pages a read touches count towards the process's
resident set until the file is closed, so :class:`ShardReader` closes and reopens a file every
``reopen_bytes`` read, which bounds that overhead whatever the shard size.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Self

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moekit.rundir import atomic_write, atomic_write_json

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
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
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


class ShardReader:
    """The tensors of an HF checkpoint directory: one ``model.safetensors`` or an index and its shards.

    ``shape(key)``, ``dtype(key)`` read headers only; ``get(key, index=None)`` returns one tensor (or
    ``tensor[index]`` read without the rest) in its stored dtype.
    """

    def __init__(self, path: Path, reopen_bytes: int | None = None):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: has no 'weight_map'")
            self.files = {k: self.path / f for k, f in weight_map.items()}
        elif (self.path / SINGLE_FILE).is_file():
            self.files = {}
            with self._open(self.path / SINGLE_FILE) as f:
                names = f.keys()
                self.files = dict.fromkeys(names, self.path / SINGLE_FILE)
        else:
            raise ValueError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}; not a safetensors checkpoint")
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in sorted(set(self.files.values())):
            if not file.is_file():
                raise ValueError(f"{file}: missing (listed in {INDEX_FILE})")
            with self._open(file) as f:
                names = f.keys()
                for k in names:
                    s = f.get_slice(k)
                    self._meta[k] = (tuple(s.get_shape()), s.get_dtype())
        absent = sorted(k for k in self.files if k not in self._meta)
        if absent:
            raise ValueError(f"{self.path}: {INDEX_FILE} lists tensors its shards do not hold: {absent[:5]}")
        # mapped pages read since the last reopen stay resident: ~1/32 of the weights, within [8 MB, 256 MB]
        self.reopen_bytes = reopen_bytes or min(max(self.nbytes() // 32, 8 * 2**20), 256 * 2**20)
        self._handle: Any = None
        self._handle_file: Path | None = None
        self._read_since_open = 0

    @staticmethod
    def _open(file: Path):
        try:
            return safe_open(str(file), framework="pt")
        except FileNotFoundError:
            raise ValueError(f"{file}: no such file") from None
        except (SafetensorError, OSError) as e:
            raise ValueError(
                f"{file}: cannot read safetensors ({e}); the file is truncated or damaged"
            ) from e

    def keys(self) -> list[str]:
        return list(self._meta)

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def __contains__(self, key: str) -> bool:
        return key in self._meta

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        name = self._meta[key][1]
        if name not in _ST_DTYPES:
            raise ValueError(f"{key}: safetensors dtype {name} is not supported")
        return _ST_DTYPES[name]

    def nbytes(self) -> int:
        return sum(torch.Size(s).numel() * self.dtype(k).itemsize for k, (s, _) in self._meta.items())

    def get(self, key: str, index: int | None = None) -> torch.Tensor:
        file = self.files[key]
        # the pages read so far stay resident while the file is mapped: close it every reopen_bytes
        if self._handle is None or self._handle_file != file or self._read_since_open > self.reopen_bytes:
            self.close()
            self._handle = self._open(file).__enter__()
            self._handle_file = file
        t = self._handle.get_tensor(key) if index is None else self._handle.get_slice(key)[index]
        self._read_since_open += t.numel() * t.element_size()
        return t

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle, self._handle_file, self._read_since_open = None, None, 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
