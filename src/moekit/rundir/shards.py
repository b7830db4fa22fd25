"""Read the tensors of a safetensors checkpoint directory, one file or an index and its shards.

Used for moekit run directories (``moekit new`` writes shards) and Hugging Face checkpoints alike.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import torch
from safetensors import SafetensorError, safe_open

from moekit.rundir.files import MODEL_FILE, MODEL_INDEX_FILE

__all__ = ["ShardReader"]

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


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except json.JSONDecodeError as e:
        raise ValueError(f"{index}: not valid JSON ({e})") from e
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: has no 'weight_map'")
    return weight_map


class ShardReader:
    """The tensors of an HF checkpoint directory: one ``model.safetensors`` or an index and its shards.

    ``shape(key)``, ``dtype(key)`` read headers only; ``get(key, index=None)`` returns one tensor (or
    ``tensor[index]`` read without the rest) in its stored dtype.
    """

    def __init__(self, path: Path, reopen_bytes: int | None = None):
        self.path = Path(path)
        index = self.path / MODEL_INDEX_FILE
        if index.is_file():
            self.files = {k: self.path / f for k, f in _weight_map(index).items()}
        elif (self.path / MODEL_FILE).is_file():
            self.files = {}
            with self._open(self.path / MODEL_FILE) as f:
                names = f.keys()
                self.files = dict.fromkeys(names, self.path / MODEL_FILE)
        else:
            raise ValueError(f"{self.path}: no {MODEL_FILE} or {MODEL_INDEX_FILE}; not a safetensors checkpoint")
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in sorted(set(self.files.values())):
            if not file.is_file():
                raise ValueError(f"{file}: missing (listed in {MODEL_INDEX_FILE})")
            with self._open(file) as f:
                names = f.keys()
                for k in names:
                    s = f.get_slice(k)
                    self._meta[k] = (tuple(s.get_shape()), s.get_dtype())
        absent = sorted(k for k in self.files if k not in self._meta)
        if absent:
            raise ValueError(f"{self.path}: {MODEL_INDEX_FILE} lists tensors its shards do not hold: {absent[:5]}")
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
