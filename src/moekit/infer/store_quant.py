"""Expert store of a quantized run directory (``moekit quantize``): each expert's packed weights and scales
read straight from its safetensors file, one expert at a time, as stored (nothing is dequantized here).

Legend: E experts, O output rows, I inputs, N groups of one row (int4), H expert hidden, D model dim.

A quantized run holds, per MoE block i and projection ``w`` (w_gate, w_up (H, D); w_down (D, H)), the
tensors of :func:`moekit.nn.quantized.quantized_shapes`: ``layers.{i}.ffn.experts.{w}_q`` (E, O, I) int8 or
(E, O, I/2) packed uint8, ``{w}_scale`` (E, O) uint8 codes or (E, O, N) fp16, and int8's ``{w}_base`` (E,)
fp32. Row e of each is one contiguous byte range, so an expert is 6 (int4) or 9 (int8) extents, named
``{w}_q``, ``{w}_scale``, ``{w}_base`` in :attr:`ExpertStore.extents`; the read paths (pread with the page
cache dropped, or mmap) and the load-time checks (missing file, truncated tensor) are the float store's.
"""
from __future__ import annotations

import os

import torch

from moekit.config import QuantSpec
from moekit.infer.store import EXPERT_PARTS, ExpertStore, StoreError
from moekit.nn.quantized import quantized_shapes

__all__ = ["QuantizedExpertStore"]

_Q_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "F16": torch.float16, "F32": torch.float32}


class QuantizedExpertStore(ExpertStore):
    """The routed experts of a quantized run directory in the stored format ``spec`` (int8 / int4).

    ``layers``: {block index: (E, H, D, gated)}. ``expert_nbytes()`` is the stored size of one expert
    (packed weights + scales + bases): what an expert costs in the cache's byte budget."""

    def __init__(self, path: str | os.PathLike[str], layers: dict[int, tuple[int, int, int, bool]],
                 spec: QuantSpec, *, read: str = "pread"):
        self.spec = spec
        super().__init__(path, layers, layout="quantized", read=read)

    def _plan(self, moe_prefix: str, names: dict[str, str]) -> torch.dtype:
        for i, (E, H, D, gated) in self.layers.items():
            for which in EXPERT_PARTS if gated else EXPERT_PARTS[1:]:
                O, I = (D, H) if which == "w_down" else (H, D)
                for part, (shape, dtype) in quantized_shapes(self.spec.fmt, E, O, I, self.spec.group).items():
                    name = f"layers.{i}.ffn.experts.{which}_{part}"
                    rows = self._rows(name, E, shape[1:], dtypes=_Q_DTYPES)
                    if rows and rows[0].dtype != dtype:
                        raise StoreError(f"{rows[0].file}: quantized tensor {name!r} is {rows[0].dtype}, the "
                                         f"{self.spec.fmt} format stores {dtype}")
                    for e, ext in enumerate(rows):
                        self.extents.setdefault((i, e), {})[f"{which}_{part}"] = ext
        # the parts have several dtypes; the compute dtype is the resident model's, not the file's
        return torch.float32

    def expert_nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Stored bytes of one expert: packed weights, scales and bases of its projections (``dtype`` unused)."""
        return sum(x.nbytes for x in next(iter(self.extents.values())).values())
