"""Expert store: routed expert weights read straight from a checkpoint's safetensors, one expert at a time.

Legend: E experts, H expert hidden, D model dim.

Where one expert's weights are, for every layout moekit loads (no conversion pass, no copy of the file):
- a moekit run directory: ``layers.{i}.ffn.experts.w_gate`` / ``w_up`` (E, H, D), ``w_down`` (E, D, H),
  in ``model.safetensors`` or shards listed by ``model.safetensors.index.json``;
- an HF checkpoint, per-expert tensors: ``model.layers.{i}.mlp.experts.{e}.gate_proj.weight`` (H, D) ...;
- an HF checkpoint, fused 3-D tensors: ``experts.gate_up_proj`` (E, 2H, D), gate first, and
  ``experts.down_proj`` (E, D, H);
- an architecture's own fused tensors, placed by its adapter's :class:`moekit.hf.adapter.ExpertRows`:
  GraniteMoE / JetMoE ``input_linear`` (E, 2H, D) and ``output_linear`` (E, D, H); DBRX ``w1`` / ``v1``
  (E·H, D) and ``w2`` (E·H, D), which holds each expert's down matrix transposed.
In every case one expert's gate, up or down matrix is ONE contiguous byte range of one file (row e of
a C-contiguous (E, ...) tensor, rows [eH, (e+1)H) of an (E·H, D) one, or a whole per-expert tensor; a
transposed one is transposed as it is copied into place), so the store keeps, per (layer, expert),
three :class:`Extent` (file, byte offset, length) computed from the safetensors headers, which it parses
itself (8-byte little-endian header length, JSON header, data). They are checked against the file sizes
when the store is built, so a truncated or missing shard fails at load, naming the file and the tensor.

Two read paths, the same bytes:
- ``"pread"`` (default): ``os.preadv`` into a preallocated buffer, then ``posix_fadvise(DONTNEED)`` on the
  range, so the page cache does not grow with the experts read (file-backed RSS stays ~0);
- ``"mmap"``: ``safetensors.safe_open(...).get_slice(name)[e]`` (memory-mapped; the mapped pages count as
  file-backed RSS and stay in the page cache).
"""
from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.rundir import MODEL_FILE, MODEL_INDEX_FILE

__all__ = ["EXPERT_PARTS", "ExpertStore", "Extent", "StoreError", "expert_ranges", "safetensors_header"]

EXPERT_PARTS = ("w_gate", "w_up", "w_down")
INDEX_FILE = MODEL_INDEX_FILE
SINGLE_FILE = MODEL_FILE
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_HF_PART = {"w_gate": "gate", "w_up": "up", "w_down": "down"}


class StoreError(ValueError):
    """An expert tensor is missing, misshapen, or lies beyond the end of its (truncated) file."""


@dataclass(frozen=True)
class Extent:
    """One expert's matrix: ``nbytes`` bytes at ``offset`` of ``file`` (tensor ``tensor``, row ``index``
    of it, or the whole tensor when None; ``part`` = 0/1 picks the gate/up half of a fused gate_up row).
    ``shape`` is the matrix's; ``transposed``: the bytes hold its transpose (shape reversed); ``flat``: the
    tensor is (E·R, C), expert ``index`` its rows [index·R, (index+1)·R) of the stored R x C matrix."""

    file: Path
    tensor: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    index: int | None = None
    part: int | None = None
    transposed: bool = False
    flat: bool = False
    columns: int | None = None  # 0/1: the even/odd columns of an interleaved (D, 2H) row, transposed
    # MXFP4 (gpt-oss): these bytes are the matrix's (rows, groups, 16) blocks, ``scales`` its (rows, groups)
    # scales; ``mx_pick`` 0/1 takes the even/odd rows of an interleaved gate_up row
    scales: Extent | None = None
    mx_pick: int | None = None

    @property
    def total_nbytes(self) -> int:
        return self.nbytes + (self.scales.nbytes if self.scales is not None else 0)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        if self.scales is not None:
            return (*self.scales.shape, 16)
        if self.columns is not None:
            return (self.shape[1], 2 * self.shape[0])
        return self.shape[::-1] if self.transposed else self.shape

    def place(self, raw: Tensor) -> Tensor:
        """The matrix from its stored bytes' tensor (``stored_shape``): a view, maybe strided."""
        if self.columns is not None:
            D, H2 = raw.shape
            return raw.view(D, H2 // 2, 2)[:, :, self.columns].t()
        return raw.t() if self.transposed else raw


def safetensors_header(file: Path) -> tuple[dict[str, Any], int]:
    """(header dict, byte offset of the data section) of a safetensors file, read without mapping it."""
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise StoreError(f"{file}: {len(raw)} bytes, too short for a safetensors header (truncated)")
            (n,) = struct.unpack("<Q", raw)
            text = f.read(n)
    except FileNotFoundError:
        raise StoreError(f"{file}: no such file") from None
    if len(text) < n:
        raise StoreError(f"{file}: header of {n} bytes, file ends after {len(text)} (truncated)")
    try:
        return json.loads(text), 8 + n
    except json.JSONDecodeError as e:
        raise StoreError(f"{file}: damaged safetensors header ({e})") from e


def _weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> file, from the index of a sharded checkpoint or the single file."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise StoreError(f"{index}: has no 'weight_map'")
        return {k: path / f for k, f in weight_map.items()}
    single = path / SINGLE_FILE
    if not single.is_file():
        raise StoreError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}; not a safetensors checkpoint")
    header, _ = safetensors_header(single)
    return {k: single for k in header if k != "__metadata__"}


class ExpertStore:
    """The routed experts of every MoE layer of a checkpoint directory, read one expert at a time.

    ``layout``: ``"moekit"`` (run directory names) or ``"hf"`` with ``moe_prefix`` (e.g. ``"mlp."``) and
    ``names`` (the adapter's gate/up/down projection names), ``layer_prefix`` (HF layer i is
    ``{layer_prefix}{i}.``) and, for an architecture's own fused tensors, ``rows`` (its
    :class:`moekit.hf.adapter.ExpertRows`). ``layers``: {block index: (E, H, D, gated)}.
    """

    def __init__(self, path: str | os.PathLike[str], layers: dict[int, tuple[int, int, int, bool]], *,
                 layout: str = "moekit", moe_prefix: str = "mlp.", names: dict[str, str] | None = None,
                 read: str = "pread", layer_prefix: str = "model.layers.", rows: Any = None):
        if read not in ("pread", "mmap"):
            raise ValueError(f"read={read!r} must be 'pread' or 'mmap'")
        self.path, self.read_mode, self.layout = Path(path), read, layout
        self.layers = dict(layers)
        self._files = _weight_files(self.path)
        self._headers: dict[Path, tuple[dict[str, Any], int, int]] = {}
        self.extents: dict[tuple[int, int], dict[str, Extent]] = {}
        self.tensor_names: set[str] = set()  # every checkpoint tensor that holds routed experts
        self._layer_prefix, self._expert_rows = layer_prefix, rows
        self.file_dtype = self._plan(moe_prefix, names or {})
        self._fds: dict[Path, int] = {}
        self._mmaps: dict[Path, Any] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    # -- planning: headers, names, bounds --------------------------------------------------------------
    def _plan(self, moe_prefix: str, names: dict[str, str]) -> torch.dtype:
        """Fill ``extents`` (gate, up, down of every expert); returns the experts' one stored dtype."""
        for i, (E, H, D, gated) in self.layers.items():
            parts = EXPERT_PARTS if gated else EXPERT_PARTS[1:]
            for which in parts:
                shape = (D, H) if which == "w_down" else (H, D)
                locate = self._locate_moekit if self.layout == "moekit" else self._locate_hf
                for e, ext in enumerate(locate(i, which, E, shape, moe_prefix, names)):
                    self.extents.setdefault((i, e), {})[which] = ext
        dtypes = {x.dtype for exts in self.extents.values() for x in exts.values()}
        if len(dtypes) > 1:
            raise StoreError(f"{self.path}: routed experts stored in several dtypes {sorted(map(str, dtypes))}")
        return dtypes.pop() if dtypes else torch.float32

    def _header(self, file: Path, tensor: str) -> tuple[dict[str, Any], int, int]:
        if file not in self._headers:
            if not file.is_file():
                raise StoreError(f"{file}: missing shard (holds expert tensor {tensor!r})")
            header, data = safetensors_header(file)
            self._headers[file] = (header, data, file.stat().st_size)
        return self._headers[file]

    def _tensor(self, name: str, shape: tuple[int, ...], dtypes: dict[str, torch.dtype] = _ST_DTYPES,
                ) -> tuple[Path, int, int, torch.dtype, dict]:
        """(file, absolute start, absolute end, dtype, entry) of a tensor; checked against the file size."""
        file = self._files.get(name)
        if file is None:
            raise StoreError(f"{self.path}: expert tensor {name!r} is in no checkpoint file")
        header, data, size = self._header(file, name)
        entry = header.get(name)
        if entry is None:
            raise StoreError(f"{file}: does not hold expert tensor {name!r} (the index says it does)")
        if tuple(entry["shape"]) != tuple(shape):
            raise StoreError(f"{file}: expert tensor {name!r} has shape {tuple(entry['shape'])}, expected {shape}")
        if entry["dtype"] not in dtypes:
            raise StoreError(f"{file}: expert tensor {name!r} has dtype {entry['dtype']}, not one of {sorted(dtypes)}")
        start, end = (data + o for o in entry["data_offsets"])
        if end > size:
            raise StoreError(f"{file}: truncated: expert tensor {name!r} needs bytes up to {end}, the file has {size}")
        self.tensor_names.add(name)
        return file, start, end, dtypes[entry["dtype"]], entry

    def _rows(self, name: str, E: int, row_shape: tuple[int, ...], split: int | None = None,
              dtypes: dict[str, torch.dtype] = _ST_DTYPES, *, flat: bool = False,
              transposed: bool = False) -> list[Extent]:
        """Row e of an (E, *row_shape) tensor per expert (or of an (E·R, C) one when ``flat``); with
        ``transposed`` each row holds the transpose of the matrix wanted."""
        stored = (E * row_shape[0], *row_shape[1:]) if flat else (E, *row_shape)
        file, start, _, dtype, _ = self._tensor(name, stored, dtypes)
        row = torch.Size(row_shape).numel() * dtype.itemsize
        if split is None:
            shape = row_shape[::-1] if transposed else row_shape
            return [Extent(file, name, start + e * row, row, shape, dtype, e, None, transposed, flat)
                    for e in range(E)]
        half, hshape = row // 2, (row_shape[0] // 2, row_shape[1])
        return [Extent(file, name, start + e * row + split * half, half, hshape, dtype, e, split) for e in range(E)]

    def _locate_moekit(self, i: int, which: str, E: int, shape, _prefix, _names) -> list[Extent]:
        return self._rows(f"layers.{i}.ffn.experts.{which}", E, shape)

    def _locate_hf(self, i: int, which: str, E: int, shape, prefix: str, names: dict[str, str]) -> list[Extent]:
        if self._expert_rows is not None:
            return self._locate_fused(f"{self._layer_prefix}{i}.", which, E, shape)
        base = f"{self._layer_prefix}{i}.{prefix}experts."
        if which == "w_down" and base + "down_proj" in self._files:
            return self._rows(base + "down_proj", E, shape)
        if which != "w_down" and base + "gate_up_proj" in self._files:
            return self._rows(base + "gate_up_proj", E, (2 * shape[0], shape[1]), split=int(which == "w_up"))
        out = []
        for e in range(E):
            name = f"{base}{e}.{names.get(_HF_PART[which], _HF_PART[which] + '_proj')}.weight"
            file, start, end, dtype, _ = self._tensor(name, shape)
            out.append(Extent(file, name, start, end - start, shape, dtype))
        return out

    def _locate_mxfp4(self, name: str, E: int, shape, pick: int | None) -> list[Extent]:
        """Expert e's blocks row (R, G, 16) and scales row (R, G) of an (out, in) MXFP4 matrix; with ``pick``
        the gate (even) or up (odd) rows of an interleaved gate_up one (R = 2H)."""
        rows, cols = (2 * shape[0] if pick is not None else shape[0]), shape[1]
        u8 = {"U8": torch.uint8}
        blocks = self._rows(name + "_blocks", E, (rows, cols // 32, 16), dtypes=u8)
        scales = self._rows(name + "_scales", E, (rows, cols // 32), dtypes=u8)
        return [replace(b, shape=shape, scales=s, mx_pick=pick) for b, s in zip(blocks, scales)]

    def _locate_fused(self, layer: str, which: str, E: int, shape) -> list[Extent]:
        r = self._expert_rows
        if which == "w_down" and r.gate_up_interleaved is not None and layer + r.down + "_blocks" in self._files:
            return self._locate_mxfp4(layer + r.down, E, shape, None)
        if which == "w_down":
            if r.down_transposed:  # expert e's (H, D) rows, the transpose of its (D, H) down
                return self._rows(layer + r.down, E, shape[::-1], flat=r.flat, transposed=True)
            return self._rows(layer + r.down, E, shape, flat=r.flat)
        if r.gate_up is not None:
            return self._rows(layer + r.gate_up, E, (2 * shape[0], shape[1]), split=int(which == "w_up"))
        if r.gate_up_interleaved is not None and layer + r.gate_up_interleaved + "_blocks" in self._files:
            return self._locate_mxfp4(layer + r.gate_up_interleaved, E, shape, int(which == "w_up"))
        if r.gate_up_interleaved is not None:  # one (D, 2H) row holds both: read once (see read)
            H, D = shape
            rows = self._rows(layer + r.gate_up_interleaved, E, (D, 2 * H))
            return [replace(x, shape=shape, columns=int(which == "w_up")) for x in rows]
        return self._rows(layer + (r.gate if which == "w_gate" else r.up), E, shape, flat=r.flat)

    # -- sizes ----------------------------------------------------------------------------------------
    def expert_nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of one expert (gate + up + down) held in ``dtype`` (default: as stored)."""
        exts = next(iter(self.extents.values()))
        item = (dtype or self.file_dtype).itemsize
        return sum(torch.Size(x.shape).numel() * item for x in exts.values())

    def num_experts(self) -> int:
        return len(self.extents)

    # -- reading --------------------------------------------------------------------------------------
    def read(self, layer: int, expert: int, out: dict[str, Tensor], staging: Tensor | None = None) -> int:
        """Fill ``out[which]`` (preallocated, shape of the matrix, any float dtype) with expert ``expert``
        of MoE block ``layer``; returns the bytes read from the file. ``staging``: a uint8 buffer of at
        least one matrix's stored size, used when ``out``'s dtype differs from the stored one."""
        n, held, raw = 0, None, None  # held: the extent whose bytes are in ``raw`` (gate and up share a row)
        for which, ext in self.extents[(layer, expert)].items():
            dst = out[which]
            direct = ext.columns is None and not ext.transposed and ext.scales is None
            if self.read_mode == "pread" and dst.dtype == ext.dtype and dst.is_contiguous() and direct:
                self._pread(ext, dst.view(-1).view(torch.uint8))
                n += ext.nbytes
                continue
            if held is None or (held.file, held.offset) != (ext.file, ext.offset):
                raw, held = self._stored(ext, staging), ext
                n += ext.total_nbytes
            if ext.scales is not None:  # dequantized as the resident MXFP4 load does it
                from moekit.hf.mxfp4 import dequantize_mxfp4

                blocks, scales = raw
                if ext.mx_pick is not None:
                    blocks, scales = (t.unfold(0, 2, 2).select(-1, ext.mx_pick) for t in (blocks, scales))
                dequantize_mxfp4(blocks, scales, out=dst)
            else:  # the same cast (and transpose or column pick) as a resident load
                dst.copy_(ext.place(raw))
        with self._lock:
            self.bytes_read += n
        return n

    def _stored(self, ext: Extent, staging: Tensor | None) -> Any:
        """The extent's stored tensor (``stored_shape``), or (blocks, scales) of an MXFP4 one, read through
        ``staging`` (pread) or memory-mapped."""
        if self.read_mode == "mmap":
            t = self._read_mmap(ext)
            return (t, self._read_mmap(ext.scales)) if ext.scales is not None else t
        if staging is None or staging.numel() < ext.total_nbytes:
            staging = torch.empty(ext.total_nbytes, dtype=torch.uint8)
        raw = staging[: ext.nbytes]
        self._pread(ext, raw)
        t = raw.view(ext.dtype).view(ext.stored_shape)
        if ext.scales is None:
            return t
        sc = staging[ext.nbytes : ext.total_nbytes]
        self._pread(ext.scales, sc)
        return t, sc.view(ext.scales.shape)

    def _fd(self, file: Path) -> int:
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(file, os.O_RDONLY)
                # no readahead: it would cache the next expert's pages, which DONTNEED after a read misses
                os.posix_fadvise(self._fds[file], 0, 0, os.POSIX_FADV_RANDOM)
            return self._fds[file]

    def _pread(self, ext: Extent, buf_u8: Tensor) -> None:
        fd, mv, done = self._fd(ext.file), memoryview(buf_u8.numpy()), 0
        while done < ext.nbytes:  # preadv may return short counts
            got = os.preadv(fd, [mv[done:]], ext.offset + done)
            if got <= 0:
                raise StoreError(f"{ext.file}: ends inside expert tensor {ext.tensor!r} (truncated after load?)")
            done += got
        # drop the pages just read: the experts' bytes live in the cache's buffers, not twice
        os.posix_fadvise(fd, ext.offset, ext.nbytes, os.POSIX_FADV_DONTNEED)

    def _read_mmap(self, ext: Extent) -> Tensor:
        from safetensors import safe_open

        with self._lock:
            if ext.file not in self._mmaps:
                self._mmaps[ext.file] = safe_open(str(ext.file), framework="pt").__enter__()
            f = self._mmaps[ext.file]
        if ext.index is None:
            return f.get_tensor(ext.tensor)
        if ext.flat:
            R = ext.stored_shape[0]
            return f.get_slice(ext.tensor)[ext.index * R:(ext.index + 1) * R]
        t = f.get_slice(ext.tensor)[ext.index]
        if ext.part is None:
            return t
        h = ext.shape[0]
        return t[:h] if ext.part == 0 else t[h:]

    def drop_page_cache(self) -> None:
        """Advise the kernel to drop every cached page of the expert files (for cold-read measurements)."""
        for file in set(self._files.values()):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def files(self) -> list[Path]:
        return sorted(set(self._files.values()))

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            for f in self._mmaps.values():
                f.__exit__(None, None, None)
            self._fds.clear()
            self._mmaps.clear()


def expert_ranges(store: ExpertStore) -> dict[Path, list[tuple[int, int]]]:
    """{file: [(offset, nbytes)]} of every expert matrix (for page-cache accounting)."""
    out: dict[Path, list[tuple[int, int]]] = {}
    for exts in store.extents.values():
        for x in exts.values():
            out.setdefault(x.file, []).append((x.offset, x.nbytes))
    return out
