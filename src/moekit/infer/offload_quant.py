"""Experts beyond RAM for a quantized run: the cache holds each expert's packed weights as stored, the
compute is the quantized model's own.

Legend: T tokens, D model dim, E experts, H expert hidden, O output rows, N groups of one row (int4),
A kept assignments sorted by expert.

Three parts swap in for the float ones of :mod:`moekit.infer.offload`, the cache decisions, loader thread,
prefetch and trace staying as they are:
- :class:`moekit.infer.store_quant.QuantizedExpertStore` reads an expert's q / scale / base rows by extent;
- :class:`QuantizedExpertCache`: a slot holds the expert's stored bytes (packed weights, scales, bases),
  read straight into it, so a byte budget holds ~4x (int8) / ~7x (int4, group 32) more experts than fp32;
- :class:`OffloadedQuantizedExperts` runs :func:`moekit.nn.quantized.expert_ffn`, the per-expert kernel of
  the resident :class:`moekit.nn.quantized.QuantizedGroupedExperts`, on the same rows in the same order
  (int4 dequantizing into one reusable buffer), so the logits are bit-identical to the resident quantized
  model's: the same element-wise decode of the scales, the same matmuls on the same values, one combine.
Dequantizing whole experts into the cache instead was not taken: the cache would hold fp32 bytes again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moekit.infer.offload import ExpertCache, OffloadedModel
from moekit.infer.store_quant import QuantizedExpertStore
from moekit.nn.quantized import (
    QuantizedGroupedExperts,
    expert_ffn,
    expert_scales,
    set_module,
    sort_assignments,
)

__all__ = ["OffloadedQuantizedExperts", "QuantizedExpertCache", "build_offloaded_quantized"]

_COPY_ALIGN = 64  # fresh CPU tensors are 64-byte aligned


class QuantizedExpertCache(ExpertCache):
    """An :class:`ExpertCache` whose slot holds an expert's stored parts as they are in the file (``{w}_q``,
    ``{w}_scale``, int8's ``{w}_base``), read straight into it: a slot is the stored size plus at most 128
    bytes of alignment per part, so the byte budget is the memory the cache takes. The scales are decoded
    per call (a few us per expert: 1/I of the work of its matmul); decoding them into the slot instead would
    grow an int4 slot by 11 % (fp32 scales of groups of 32)."""

    _pad = _COPY_ALIGN

    def _slot_parts(self, first: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {p: (ext.shape, ext.dtype) for p, ext in first.items()}

    def _target(self, key: tuple[int, int], which: str, n: int) -> tuple[int, int]:
        # row e of the resident model's (E, ...) tensor, read from the file into a fresh tensor
        return (key[1] * n) % _COPY_ALIGN, _COPY_ALIGN


class OffloadedQuantizedExperts(nn.Module):
    """Drop-in for :class:`QuantizedGroupedExperts` (same forward) whose experts come from a
    :class:`QuantizedExpertCache`; inference only.

    1. sort the assignments by expert, as the resident module does;
    2. pin the experts with rows (misses queued on the loader thread; then the next layer's prefetch); a
       call needing more experts than the cache holds runs them in chunks of its capacity;
    3. per expert, in expert order: wait for its load, run its FFN (int4 dequantizing into a reusable buffer);
    4. release the pins, combine all rows at once (so chunking does not change the sums' order)."""

    def __init__(self, layer: int, cache: QuantizedExpertCache, src: QuantizedGroupedExperts):
        super().__init__()
        self.layer, self.cache = layer, cache
        self.fmt, self.group, self.activation, self.names = src.fmt, src.group, src.activation, src.names
        self.shapes = dict(src.shapes)
        self.after_acquire = None  # the Prefetcher's hook: called once this call's experts are pinned
        self._buf: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.shapes["w_up"][0]

    def _buffer(self, x_TD: Tensor) -> Tensor | None:
        """int4's dequantization buffer, kept across calls (int8 needs none: see expert_linear)."""
        if self.fmt != "int4":
            return None
        n = max(O * I for _, O, I in self.shapes.values())
        if self._buf is None or self._buf.dtype != x_TD.dtype:
            with torch.inference_mode(False):  # kept across calls, in and out of inference mode
                self._buf = x_TD.new_empty(n)
        return self._buf

    def _weights(self, e: int, dtype: torch.dtype):
        """name -> (q, scales) of expert e, the scales decoded as the resident module decodes all experts'."""
        c, layer, fmt = self.cache, self.layer, self.fmt

        def get(n: str) -> tuple[Tensor, Tensor]:
            base = c.weight(layer, e, n + "_base")[None] if fmt == "int8" else None
            return c.weight(layer, e, n + "_q"), expert_scales(fmt, c.weight(layer, e, n + "_scale")[None], base, dtype)[0]

        return get

    def forward(self, x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x_TD.requires_grad:
            raise RuntimeError("OffloadedQuantizedExperts is inference-only: run under torch.no_grad()")
        plan = sort_assignments(x_TD, token_A, expert_A, weight_A, self.num_experts)  # 1.
        runs, cap = list(plan.runs()), self.cache.capacity
        y_AD = torch.empty_like(plan.x_AD)
        buf = self._buffer(x_TD)
        for c in range(0, max(len(runs), 1), cap):
            chunk = runs[c:c + cap]
            self.cache.acquire(self.layer, [e for e, _ in chunk])  # 2.
            if len(runs) <= cap and self.after_acquire is not None:
                self.after_acquire()
            try:
                for e, sl in chunk:  # 3.
                    y_AD[sl] = expert_ffn(plan.x_AD[sl], self._weights(e, x_TD.dtype), self.fmt, self.group, self.activation, buf)
            finally:
                self.cache.end_group(self.layer)  # 4.
        return plan.combine(x_TD, y_AD)

    def extra_repr(self) -> str:
        E, H, D = self.shapes["w_up"]
        return f"layer={self.layer}, fmt={self.fmt!r}, num_experts={E}, d_model={D}, d_hidden={H}, offloaded"


def build_offloaded_quantized(path: Path, budget: int | str, policy: str, prefetch: bool, read: str,
                              dtype: torch.dtype | str | None, predictor: Any = None) -> OffloadedModel:
    """``moekit.infer.offload_loader.build_offloaded`` for a quantized run directory: 1. the store (every
    extent checked now); 2. the budget in stored expert bytes; 3. the resident quantized model without its
    routed experts (``load_quantized`` with those tensors skipped); 4. its experts swapped for offloaded ones."""
    from moekit.hf.common import parse_dtype
    from moekit.infer.offload_loader import _capacity, _layers, _tokenizer
    from moekit.infer.prefetch import Prefetcher
    from moekit.rundir import RunDir
    from moekit.rundir.quantized import load_quantized, read_quant_spec

    run = RunDir(path)
    cfg = run.config()
    store = QuantizedExpertStore(path, _layers(cfg), read_quant_spec(run), read=read)  # 1.
    try:
        capacity, retain = _capacity(budget, cfg, store, None, store.expert_nbytes())  # 2.
        model = load_quantized(run, parse_dtype(dtype), skip=frozenset(store.tensor_names))  # 3.
    except BaseException:
        store.close()
        raise
    cache = QuantizedExpertCache(store, capacity, policy, retain=retain, dtype=model.embed.weight.dtype)
    for b in model.layers:  # 4.
        if b.is_moe:
            set_module(model, f"layers.{b.idx}.ffn.experts", OffloadedQuantizedExperts(b.idx, cache, b.ffn.experts))
    on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if on_meta:
        raise RuntimeError(f"offloaded model: tensors left on the meta device: {on_meta[:5]}")
    non_expert = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    pre = Prefetcher(model, cache, predictor=predictor) if prefetch else None
    return OffloadedModel(model, _tokenizer(path, True), cache, pre, path, non_expert)
