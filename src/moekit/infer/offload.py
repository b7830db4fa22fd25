"""Experts beyond RAM: an MoE model whose routed experts live on disk, with a hot-expert cache and prefetch.

Legend: T tokens, D model dim, E experts, H expert hidden, A assignments, S kept assignments sorted by expert.

The offloaded model is the resident model with one part swapped: each MoE layer's ``experts``
(:class:`moekit.nn.experts.GroupedExperts`) is replaced by :class:`OffloadedExperts`, whose forward has
the same signature and runs the same kernel (``moekit.ops.grouped_ffn._sorted_forward``) on the same
inputs; only the weights come from :class:`ExpertCache` slots instead of one (E, H, D) tensor. So the
outputs are bit-identical to the resident model's. A layer call:
1. sorts its assignments by expert exactly as the fused op does, and asks the cache for the experts with
   rows (pinned for the call; misses are queued on the loader threads at once, in expert order);
2. lets the ``moekit.infer.prefetch.Prefetcher`` queue the experts the NEXT layer will most likely need (that layer's
   norm and router applied to the residual stream seen before this layer's FFN);
3. runs the kernel; each expert's weights are waited for only when its GEMM starts, so loads overlap
   with the GEMMs of the experts before it;
4. releases the pins. If a call needs more experts than the cache holds (a long prefill on a small
   budget), it runs in chunks of experts, the up/gate GEMMs and the down GEMMs in two passes, with the
   element-wise steps over all rows at once, as in the fused op.
Everything else (attention, norms, routers, embeddings, shared experts) is resident.
"""
from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.functional.dispatch import loop_experts_reference
from moekit.infer.cache import CacheCore, Trace, make_policy
from moekit.infer.memory import parse_budget
from moekit.infer.store import ExpertStore
from moekit.ops.expert_threads import for_each_expert, use_expert_threads
from moekit.ops.grouped_ffn import FEW_ASSIGNMENTS, _act, _few_rows_forward, _plan, _sorted_forward

__all__ = ["ExpertCache", "OffloadedExperts", "OffloadedModel", "load_offloaded", "parse_budget"]

# A GEMM's result can depend on where its operand sits (measured: the same weights at another address
# modulo 64 gave logits 1 ulp apart), so each slot matrix is placed at the resident tensor's address
# modulo the page size (memory-mapped runs) or modulo 64 (copied tensors, whose allocations are 64-aligned).
_ALIGN = 4096
_COPY_ALIGN = 64
LOADERS = 2  # reader threads: two reads in flight gave 9-17% more tokens/s offloaded here (virtual disk)


@dataclass
class _Entry:
    slot: int
    ready: threading.Event
    prefetched: bool = False
    error: BaseException | None = None
    started: bool = False  # the loader thread has begun reading (guarded by ExpertCache._io_lock)
    cancelled: bool = False  # evicted before its read began: the loader skips it


class ExpertCache:
    """Expert weights in ``capacity`` preallocated slots over an :class:`ExpertStore`, decided by a
    :class:`moekit.infer.cache.CacheCore`; loads run on ``LOADERS`` background threads (``os.preadv``
    releases the GIL). Every decision is recorded in ``trace``; ``stats()`` gives per-layer counts and times."""

    def __init__(self, store: ExpertStore, capacity: int, policy: str = "lru", *, retain: bool = True,
                 dtype: torch.dtype | None = None):
        self.store, self.dtype = store, dtype or store.file_dtype
        self.policy_name = policy
        self.core = CacheCore(capacity, make_policy(policy), retain)
        self.capacity = capacity
        # slot layout: each matrix in its own region of a slot, with room to place it at the same address
        # modulo the alignment as the resident model's tensor (see _place)
        first = next(iter(store.extents.values()))
        self._layout, off = {}, 0
        for which, (shape, dt) in self._slot_parts(first).items():
            n = torch.Size(shape).numel() * dt.itemsize
            self._layout[which] = (off, n, shape, dt)
            off += -(-(n + self._pad) // self._pad) * self._pad
        self.slot_bytes = off
        # a moekit run loaded resident without a cast is memory-mapped: its tensors sit at their file
        # offsets modulo the page size; every other resident load copies into fresh (64-byte aligned) tensors
        self._mapped = store.layout == "moekit" and self.dtype == store.file_dtype
        self.expert_bytes = store.expert_nbytes(self.dtype)
        self._slots: list[Tensor] = []
        self._views: list[dict[str, Tensor]] = []
        self._free: list[int] = []
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._staging_bytes, self._local = max(x.total_nbytes for x in first.values()), threading.local()
        # the loader threads; demand loads jump the queue ahead of prefetches (I/O order only: the
        # decisions, and so the trace, do not depend on it)
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._io_lock = threading.Lock()
        self._seq = itertools.count()
        # several readers keep more than one request in flight: a virtual disk serves them in parallel
        self._loaders = [threading.Thread(target=self._load_loop, daemon=True, name=f"moekit-expert-load-{i}")
                         for i in range(LOADERS)]
        for t in self._loaders:
            t.start()
        self.trace = Trace(capacity, policy, retain, self.expert_bytes)
        self.layer_stats: dict[int, dict[str, float]] = {}
        self.predicted: dict[int, set[int]] = {}

    # -- slots (the parts a quantized cache swaps: what a slot holds, where, and how it is filled) -----
    _pad = _ALIGN

    def _slot_parts(self, first: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name -> (shape, dtype) of each matrix a slot holds: the expert's gate, up, down in the cache dtype."""
        return {which: (ext.shape, self.dtype) for which, ext in first.items()}

    def _target(self, key: tuple[int, int], which: str, n: int) -> tuple[int, int]:
        """(address modulo ``align``, ``align``) of the resident model's matrix ``which`` of expert ``key``."""
        if self._mapped:
            return self.store.extents[key][which].offset % _ALIGN, _ALIGN
        return (key[1] * n) % _COPY_ALIGN, _COPY_ALIGN  # row e of a fresh (E, ...) tensor

    def _fill(self, key: tuple[int, int], views: dict[str, Tensor]) -> int:
        """Read expert ``key`` into its slot's views; returns the bytes read."""
        if not hasattr(self._local, "staging"):  # one per loader thread
            self._local.staging = torch.empty(self._staging_bytes, dtype=torch.uint8)
        return self.store.read(key[0], key[1], views, self._local.staging)

    def _new_slot(self) -> int:
        # a normal tensor even when the first call runs in inference mode: the loader thread and later
        # calls outside that mode write into it
        with torch.inference_mode(False):
            self._slots.append(torch.empty(self.slot_bytes, dtype=torch.uint8))
        self._views.append({})
        return len(self._slots) - 1

    def _place(self, slot: int, key: tuple[int, int]) -> dict[str, Tensor]:
        """Views of slot ``slot`` for expert ``key``, each at its resident tensor's address modulo the alignment."""
        buf, views = self._slots[slot], {}
        with torch.inference_mode(False):  # normal views of the normal slot (see _new_slot)
            for which, (o, n, shape, dt) in self._layout.items():
                target, align = self._target(key, which, n)
                pad = (target - (buf.data_ptr() + o)) % align
                views[which] = buf[o + pad:o + pad + n].view(dt).view(shape)
        self._views[slot] = views
        return views

    def _stat(self, layer: int) -> dict[str, float]:
        return self.layer_stats.setdefault(layer, {
            "accesses": 0, "hits": 0, "prefetch_hits": 0, "misses": 0, "bytes_read": 0, "stall_s": 0.0,
            "prefetched": 0, "predicted": 0, "predicted_correct": 0, "needed": 0})

    def _read(self, key: tuple[int, int], entry: _Entry) -> None:
        try:
            n = self._fill(key, self._views[entry.slot])
            with self._io_lock:
                self._stat(key[0])["bytes_read"] += n
        except BaseException as e:  # noqa: BLE001 - handed to the waiting layer call
            entry.error = e
        finally:
            entry.ready.set()

    def _load_loop(self) -> None:
        while True:
            _, _, key, entry = self._queue.get()
            if key is None:
                return
            with self._io_lock:
                if entry.cancelled:
                    entry.ready.set()
                    continue
                entry.started = True
            self._read(key, entry)

    def _load(self, key: tuple[int, int], prefetched: bool) -> None:
        slot = self._free.pop() if self._free else self._new_slot()
        entry = _Entry(slot, threading.Event(), prefetched)
        self._entries[key] = entry
        self._place(slot, key)
        self._queue.put((int(prefetched), next(self._seq), key, entry))

    def _evict(self, key: tuple[int, int] | None) -> None:
        if key is None:
            return
        entry = self._entries.pop(key)
        with self._io_lock:
            if not entry.started:  # still queued (a prefetch behind demand loads): never read it
                entry.cancelled = True
        if not entry.cancelled:
            entry.ready.wait()  # a slot is reused only after its load has finished
        self._free.append(entry.slot)

    # -- the decisions, in the caller's thread -------------------------------------------------------
    def acquire(self, layer: int, experts: list[int]) -> None:
        """Pin ``experts`` of ``layer`` for the current call; queue the misses (expert order)."""
        st = self._stat(layer)
        pred = self.predicted.pop(layer, None)
        if pred is not None:
            st["predicted"] += len(pred)
            st["predicted_correct"] += len(pred & set(experts))
            st["needed"] += len(experts)
        for e in experts:
            key = (layer, e)
            hit, victim = self.core.access(key)
            self.trace.add("a", layer, e)
            st["accesses"] += 1
            if hit:
                st["hits"] += 1
                entry = self._entries[key]
                if entry.prefetched:
                    st["prefetch_hits"] += 1
                    entry.prefetched = False
            else:
                st["misses"] += 1
                self._evict(victim)
                self._load(key, False)

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Queue ``experts`` of ``layer`` ahead of its call, where the budget allows without evicting
        anything pinned or prefetched."""
        self.predicted[layer] = set(experts)
        for e in experts:
            key = (layer, e)
            inserted, victim = self.core.prefetch(key)
            self.trace.add("p", layer, e)
            if inserted:
                self._evict(victim)
                self._load(key, True)
                self._stat(layer)["prefetched"] += 1

    def end_group(self, layer: int) -> None:
        for key in self.core.end_group(layer):
            self._evict(key)
        self.trace.add("e", layer, -1)

    def weight(self, layer: int, expert: int, which: str) -> Tensor:
        """The resident matrix of a pinned expert, waiting for its load if it is still in flight."""
        entry = self._entries[(layer, expert)]
        if not entry.ready.is_set():
            t0 = time.perf_counter()
            entry.ready.wait()
            self._stat(layer)["stall_s"] += time.perf_counter() - t0
        if entry.error is not None:
            raise entry.error
        return self._views[entry.slot][which]

    # -- reporting -----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Totals and per-layer counts, from copies: a server's metrics call it while the model runs."""
        layers = {l: dict(s) for l, s in list(self.layer_stats.items())}
        tot = {k: sum(s[k] for s in layers.values()) for k in
               ("accesses", "hits", "prefetch_hits", "misses", "bytes_read", "stall_s", "prefetched",
                "predicted", "predicted_correct", "needed")}
        return {"policy": self.policy_name, "capacity_experts": self.capacity, "expert_bytes": self.expert_bytes,
                "budget_bytes": self.capacity * self.slot_bytes, "slots_allocated": len(self._slots),
                **tot, "hit_rate": tot["hits"] / max(tot["accesses"], 1),
                "prefetch_recall": tot["predicted_correct"] / max(tot["needed"], 1),
                "prefetch_precision": tot["predicted_correct"] / max(tot["predicted"], 1),
                "per_layer": {l: dict(s, hit_rate=s["hits"] / max(s["accesses"], 1))
                              for l, s in sorted(layers.items())}}

    def drain(self) -> None:
        """Wait for every queued load (before timing a step from a quiet state, or closing)."""
        for entry in list(self._entries.values()):
            if not entry.cancelled:
                entry.ready.wait()

    def close(self) -> None:
        self.drain()
        for t in self._loaders:
            self._queue.put((2, next(self._seq), None, None))
        for t in self._loaders:
            t.join()
        self.store.close()


class _SlotWeights:
    """Stands in for an (E, H, D) expert weight inside the kernel: ``w[e]`` is expert e's cache slot."""

    def __init__(self, cache: ExpertCache, layer: int, which: str, shape: tuple[int, ...]):
        self.cache, self.layer, self.which, self.shape = cache, layer, which, torch.Size(shape)

    def __getitem__(self, e: int) -> Tensor:
        return self.cache.weight(self.layer, int(e), self.which)


class OffloadedExperts(nn.Module):
    """Drop-in for ``GroupedExperts`` (same ``forward(x_TD, token_A, expert_A, weight_A)``) whose weights
    are fetched from an :class:`ExpertCache`; inference only (no parameters, no gradients)."""

    def __init__(self, layer: int, cache: ExpertCache, num_experts: int, d_model: int, d_hidden: int,
                 activation: str = "swiglu", impl: str = "fused"):
        super().__init__()
        self.layer, self.cache, self.activation, self.impl = layer, cache, activation, impl
        E, D, H = num_experts, d_model, d_hidden
        self._E, self._D, self._H = E, D, H
        self.w_gate = _SlotWeights(cache, layer, "w_gate", (E, H, D)) if activation == "swiglu" else None
        self.w_up = _SlotWeights(cache, layer, "w_up", (E, H, D))
        self.w_down = _SlotWeights(cache, layer, "w_down", (E, D, H))
        self.after_acquire = None  # the Prefetcher's hook: called once this call's experts are pinned

    @property
    def num_experts(self) -> int:
        return self._E

    def forward(self, x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x_TD.requires_grad:
            raise RuntimeError("OffloadedExperts is inference-only: run under torch.no_grad()")
        # 1. the fused op's plan: kept assignments sorted by expert, per-expert counts on the host
        order_A, counts = _plan(expert_A, self._E)
        kept_S = order_A[:sum(counts)]
        tok_S, w_S = token_A[kept_S], weight_A[kept_S]
        needed = [e for e, n in enumerate(counts) if n]
        if len(needed) <= self.cache.capacity:
            self.cache.acquire(self.layer, needed)
            if self.after_acquire is not None:
                self.after_acquire()  # 2. queue the next layer's likely experts behind this call's misses
            try:  # 3. the resident kernel, weights from the slots
                if self.impl == "loop":
                    keep = expert_A < self._E
                    return loop_experts_reference(x_TD, token_A[keep], expert_A[keep], weight_A[keep],
                                                  self.w_gate, self.w_up, self.w_down, self.activation)
                if token_A.numel() <= FEW_ASSIGNMENTS:  # as the resident layer runs a decode step
                    return _few_rows_forward(x_TD, token_A, expert_A, weight_A, self.w_gate, self.w_up,
                                             self.w_down, self.activation)
                out_TD, _, _ = _sorted_forward(x_TD, tok_S, w_S, self.w_gate, self.w_up, self.w_down, counts,
                                               self.activation, rows=token_A.numel())
                return out_TD
            finally:
                self.cache.end_group(self.layer)  # 4.
        if self.impl == "loop":
            raise ValueError(f"expert_impl='loop' needs all {len(needed)} experts of a call resident; the "
                             f"expert cache holds {self.cache.capacity}")
        return self._chunked(x_TD, tok_S, w_S, counts, needed, token_A.numel())

    def _chunked(self, x_TD: Tensor, tok_S: Tensor, w_S: Tensor, counts: list[int], needed: list[int],
                 rows: int) -> Tensor:
        """``_sorted_forward`` with the experts in chunks of the cache's capacity: the same GEMMs on the
        same rows, the same element-wise ops over all rows, so the same bits."""
        cap, gated, S, H = self.cache.capacity, self.w_gate is not None, tok_S.numel(), self._H
        chunks = [needed[i:i + cap] for i in range(0, len(needed), cap)]
        xs_SD = x_TD.index_select(0, tok_S)
        u_RH = x_TD.new_empty(rows, H)
        g_RH = x_TD.new_empty(rows, H) if gated else None
        if rows > S:
            u_RH[S:].zero_()
            if gated:
                g_RH[S:].zero_()
        u_SH, g_SH = u_RH[:S], (g_RH[:S] if gated else None)
        par = use_expert_threads(counts, x_TD.device, x_TD.shape[1] * H)

        def run(chunk: list[int], fn) -> None:
            members = set(chunk)
            self.cache.acquire(self.layer, chunk)
            try:
                for_each_expert(counts, lambda e, sl: fn(e, sl) if e in members else None, x_TD.device, par)
            finally:
                self.cache.end_group(self.layer)

        def up_gate(e: int, sl: slice) -> None:
            torch.mm(xs_SD[sl], self.w_up[e].t(), out=u_SH[sl])
            if gated:
                torch.mm(xs_SD[sl], self.w_gate[e].t(), out=g_SH[sl])

        for chunk in chunks:  # pass 1: up and gate projections
            run(chunk, up_gate)
        h_SH = F.silu(g_SH).mul_(u_SH) if gated else _act(self.activation, u_SH)
        y_SD = x_TD.new_empty(S, x_TD.shape[1])
        for chunk in reversed(chunks):  # pass 2: down projections, the last chunk (still cached) first
            run(chunk, lambda e, sl: torch.mm(h_SH[sl], self.w_down[e].t(), out=y_SD[sl]))
        y_SD.mul_(w_S.to(y_SD.dtype).unsqueeze(1))
        return torch.zeros_like(x_TD).index_add_(0, tok_S, y_SD)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self._E}, d_model={self._D}, d_hidden={self._H}, offloaded"


@dataclass
class OffloadedModel:
    """``model`` (an MoETransformer whose experts are offloaded), its ``tokenizer`` (or None), the
    ``cache`` and the ``prefetcher`` (:class:`moekit.infer.prefetch.Prefetcher`, or None)."""

    model: nn.Module
    tokenizer: Any
    cache: ExpertCache
    prefetcher: Any
    path: Path
    non_expert_bytes: int

    def stats(self) -> dict[str, Any]:
        return self.cache.stats()

    def save_trace(self, path: str | os.PathLike[str]) -> Path:
        self.cache.trace.live = {"hits": self.cache.core.hits, "accesses": self.cache.core.accesses}
        return self.cache.trace.save(path)

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.remove()
        self.cache.close()


def load_offloaded(path: str | os.PathLike[str], expert_memory: int | str = "all", *, policy: str = "lru",
                   prefetch: bool = True, read: str = "pread", dtype: torch.dtype | str | None = None,
                   predictor: Any = None) -> OffloadedModel:
    """Load a moekit run directory or an HF checkpoint with its routed experts kept on disk (a quantized run
    directory's experts are cached and computed in their stored format: ``moekit.infer.offload_quant``).

    ``expert_memory``: bytes (``"2GiB"``) of expert cache shared by all layers, ``0`` (no reuse: every
    expert read each time it is needed) or ``"all"``. A budget below one layer's top-k experts is refused
    with the smallest that works. ``policy``: "lru" or "lfu"; ``read``: "pread" (page cache dropped after
    each read) or "mmap"; ``dtype`` as for ``moekit.hf.load_any`` (None keeps the checkpoint's);
    ``predictor(block, x) -> experts`` replaces the router-based prefetch prediction (e.g.
    ``moekit.infer.prefetch.oracle_predictor``).
    """
    from moekit.infer.offload_loader import build_offloaded
    from moekit.infer.offload_quant import build_offloaded_quantized
    from moekit.rundir import QUANT_FILE

    path = Path(path)
    build = build_offloaded_quantized if (path / QUANT_FILE).is_file() else build_offloaded
    return build(path, parse_budget(expert_memory), policy, prefetch, read, dtype, predictor)
