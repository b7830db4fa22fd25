"""Compiled decode steps over rows: many sequences, each in a row of static per-layer key/value buffers.

Legend: B rows in a step, C chunk tokens, L attended slots, h cached heads, d head dim, V vocabulary.

:class:`DecodeRows` holds the running batch of ``moekit serve --compile``: one compiled graph per batch
bucket decodes one token for every row (:func:`rows_step`); a prompt that arrives meanwhile is prefilled in a
staging row, C tokens a call, in a graph of its own (:func:`chunk_step`). The chunk was also tried riding the
decode step, one row of B + C queries through every projection and expert with only attention split per
group: no faster (default LM, 4 rows and an 8-token chunk: 2.2-2.5 ms against 2.0-2.5 for the two graphs),
since the chunk's cost is its 16 expert assignments, not a graph call; padding the decode rows to C instead
made the experts see (B + 1) x C tokens (3.3-3.8 ms).
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from moekit.infer.compiled import _check_compilable, _Graphs, _through_layers
from moekit.nn.attention import KVCache
from moekit.nn.transformer import MoETransformer

__all__ = ["DecodeRows", "RowsKVCache", "chunk_step", "row_buckets", "rows_step"]


class RowsKVCache:
    """``update`` for the rows steps: the new keys (B, h, S, d) of rows ``first_row``.. go to their slots
    ``slot_BS`` of the layer's (R, h, Lmax, d) buffers, in place (``index_put_``: a scatter would make the
    compiler copy the buffer); the attention reads those B rows' first L slots."""

    def __init__(self, k: list[Tensor], v: list[Tensor], first_row: int, slot_BS: Tensor, L: int):
        self.k, self.v, self.L = k, v, L
        B, dev = slot_BS.shape[0], slot_BS.device
        self.rows = slice(first_row, first_row + B)
        self._where = ((first_row + torch.arange(B, device=dev)).view(B, 1, 1),
                       torch.arange(k[0].shape[1], device=dev).view(1, -1, 1), slot_BS.unsqueeze(1))

    def update(self, layer: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        self.k[layer].index_put_(self._where, k_new)
        self.v[layer].index_put_(self._where, v_new)
        return self.k[layer][self.rows, :, :self.L], self.v[layer][self.rows, :, :self.L]


def rows_step(model: MoETransformer, ids_B1: Tensor, slot_B1: Tensor, real_B1: Tensor, slots_L: Tensor,
              k: list[Tensor], v: list[Tensor]) -> tuple[Tensor, dict[int, Tensor]]:
    """:func:`decode_step` for rows that each stand at their own slot: row b of the buffers ``k`` / ``v``
    (R >= B rows, Lmax slots) holds one sequence from slot 0, its next token ``ids_B1[b]`` goes to slot (and
    RoPE position) ``slot_B1[b]``; the attention reads the first L = len(``slots_L``) slots (compiled with L
    dynamic: one graph per B). Rows with ``real_B1`` False are padding: not routed, not counted."""
    B, L = ids_B1.shape[0], slots_L.shape[0]
    key_mask_BL = torch.ones(B, L, dtype=torch.bool, device=ids_B1.device)
    x, counts = _through_layers(model, ids_B1, slot_B1, slot_B1, key_mask_BL, RowsKVCache(k, v, 0, slot_B1, L),
                                real_B1)
    return model.head(x)[:, -1], counts


def chunk_step(model: MoETransformer, ids_1C: Tensor, start_1: Tensor, n_real_1: Tensor, slots_L: Tensor,
               k: list[Tensor], v: list[Tensor], row: int) -> tuple[Tensor, dict[int, Tensor]]:
    """C prompt tokens of the sequence in row ``row``, at slots (and positions) ``start_1``.. (the first
    ``n_real_1`` real, the rest padding: not routed, not counted, their keys written past the real ones and
    never seen): (logits (1, V) after the last real token, counts). L = len(``slots_L``) > start + C."""
    C, L = ids_1C.shape[1], slots_L.shape[0]
    offsets_1C = torch.arange(C, device=ids_1C.device).unsqueeze(0)
    pos_1C = start_1.view(1, 1) + offsets_1C
    key_mask_1L = torch.ones(1, L, dtype=torch.bool, device=ids_1C.device)
    x, counts = _through_layers(model, ids_1C, pos_1C, pos_1C, key_mask_1L, RowsKVCache(k, v, row, pos_1C, L),
                                offsets_1C < n_real_1.view(1, 1))
    return model.head(x.index_select(1, n_real_1 - 1))[:, -1], counts


def row_buckets(rows: int) -> list[int]:
    """The batch sizes :class:`DecodeRows` compiles for ``rows`` rows: powers of two below it, and itself."""
    return sorted({1 << i for i in range(rows.bit_length()) if 1 << i < rows} | {rows})


class DecodeRows:
    """Up to ``rows`` sequences decoding side by side, each in a row of static per-layer buffers from slot 0:
    ``row = dec.admit(cache)`` after a sequence's eager prefill (batch-1 ``KVCache``, copied in), then
    ``logits_nV, counts = dec.step(ids_n1)`` for the n admitted rows in row order; ``dec.release(row)``
    frees one (the last row moves into it, so the rows in use stay 0..n-1; returns the row that moved, or
    None). A step over n rows runs the graph of the smallest bucket >= n (:func:`row_buckets`, padding
    rows not routed or counted) and attends over the longest row's slots only. With ``chunk`` C > 0 a prompt
    can also be prefilled compiled, C tokens a call, in a staging row: ``logits_1V, counts =
    dec.stage(ids)`` (the first call after ``admit_staged`` starts a new prompt), then ``dec.admit_staged()``
    moves it into the next free row."""

    def __init__(self, model: MoETransformer, rows: int, chunk: int = 0):
        _check_compilable(model)
        if rows < 1:
            raise ValueError(f"rows={rows} must be >= 1")
        self.model, self.rows = model, rows
        self.max_len = model.config.max_seq_len
        device = model.embed.weight.device
        with torch.no_grad():  # the cache shapes (MLA caches latents) from a one-token prefill
            cache = model.new_kv_cache()
            model(torch.zeros(1, 1, dtype=torch.long, device=device), kv_cache=cache, logits_to_keep=1)
        # two slots more than the context (and a chunk's padding): L (dynamic) then never equals the buffer's
        # length, where slicing all of it would make the compiler fix L; the staging row is the last
        self.chunk = chunk
        shape = (rows + (chunk > 0), self.max_len + chunk + 2)
        self.k = [t.new_zeros(shape[0], t.shape[1], shape[1], t.shape[3]) for t in cache.k]
        self.v = [t.new_zeros(shape[0], t.shape[1], shape[1], t.shape[3]) for t in cache.v]
        # each row's next slot, on the host: a step then builds its inputs in one tensor() call, not a dozen
        # small ops on a device tensor (~40 us of a ~0.6 ms step of the default LM)
        self.slots = [0] * rows
        self._device = device
        self._arange = torch.arange(self.max_len + chunk + 2, device=device)
        self._real = {}  # (B, n): which of B rows are real
        self.n = 0
        self.staged = 0  # prompt tokens in the staging row
        self.steps = 0
        self._graphs = _Graphs(rows_step, device)
        self._chunk_graph = _Graphs(chunk_step, device)

    @property
    def compile_s(self) -> float:
        return self._graphs.compile_s + self._chunk_graph.compile_s

    def warm_up(self) -> float:
        """Compile every bucket's graph (and the chunk's) now, a throwaway call each, so that no request waits."""
        t0 = time.perf_counter()
        for B in row_buckets(self.rows):
            self.slots[:B] = [1] * B
            self.n = B
            self.step(torch.zeros(B, 1, dtype=torch.long, device=self._device))
        self.n = 0
        if self.chunk:
            self.stage(torch.zeros(1, dtype=torch.long, device=self._device))
            self.staged = 0
        return time.perf_counter() - t0

    def stage(self, ids_n: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        """The next n <= ``chunk`` prompt tokens into the staging row: (logits (1, V) after the last, counts)."""
        ids_1C, start_1, n_1, start, n = self._chunk_inputs(ids_n)
        slots_L = self._arange[:start + self.chunk + 1]  # never L == C: that would fix L
        key = (self.chunk, ids_n.dtype, torch.is_inference_mode_enabled())
        if not self._chunk_graph.has(key):
            torch._dynamo.mark_dynamic(slots_L, 0)
        out = self._chunk_graph(key, self.model, ids_1C, start_1, n_1, slots_L, self.k, self.v, self.rows)
        self.staged += n
        return out

    def _chunk_inputs(self, ids_n: Tensor) -> tuple[Tensor, Tensor, Tensor, int, int]:
        n, start = ids_n.shape[0], self.staged
        if not 0 < n <= self.chunk:
            raise ValueError(f"stage() takes 1 to chunk={self.chunk} tokens, got {n}")
        if start + n > self.max_len:
            raise ValueError(f"the prompt passes the model's context of {self.max_len} positions")
        ids_1C = ids_n.new_zeros(1, self.chunk)
        ids_1C[0, :n] = ids_n
        dev = ids_n.device
        return ids_1C, torch.tensor([start], device=dev), torch.tensor([n], device=dev), start, n

    def drop_staged(self) -> None:
        """Forget a prompt staged part of the way (its request went away)."""
        self.staged = 0

    def admit_staged(self) -> int:
        """Move the staged prompt into the next free row (a copy of its slots); returns the row."""
        if self.n == self.rows:
            raise ValueError(f"all {self.rows} rows are in use: release one first")
        row, S = self.n, self.staged
        for buf in (*self.k, *self.v):
            buf[row, :, :S].copy_(buf[self.rows, :, :S])
        self.slots[row] = S
        self.n, self.staged = self.n + 1, 0
        return row

    def admit(self, cache: KVCache) -> int:
        """Copy a batch-1, unpadded cache into the next free row; returns the row."""
        if self.n == self.rows:
            raise ValueError(f"all {self.rows} rows are in use: release one first")
        if cache.mask is not None or cache.k[0].shape[0] != 1:
            raise ValueError("admit() takes one sequence's unpadded cache (batch 1, no key mask)")
        row, S = self.n, cache.length
        for buf, t in (*zip(self.k, cache.k), *zip(self.v, cache.v)):
            buf[row, :, S - t.shape[2]:S].copy_(t[0])  # a window layer kept only its last keys
        self.slots[row] = S
        self.n += 1
        return row

    def release(self, row: int) -> int | None:
        last = self.n - 1
        self.n = last
        if row == last:
            return None
        s = self.slots[last]
        for buf in (*self.k, *self.v):
            buf[row, :, :s].copy_(buf[last, :, :s])
        self.slots[row] = s
        return last

    def clear(self) -> None:
        """Free every row."""
        self.n = 0

    def to_cache(self, row: int) -> KVCache:
        """The row's positions as an eager batch-1 :class:`KVCache` (views of the buffers)."""
        s = self.slots[row]
        cache = KVCache(len(self.k))
        cache.k = [t[row:row + 1, :, :s] for t in self.k]
        cache.v = [t[row:row + 1, :, :s] for t in self.v]
        return cache

    def _decode_inputs(self, ids_n1: Tensor) -> tuple[int, Tensor, Tensor, Tensor, list[int]]:
        """(bucket B, ids (B, 1), slots (B, 1), real rows (B, 1), the n live slots) of a step over the n rows."""
        n = self.n
        if ids_n1.shape != (n, 1):
            raise ValueError(f"ids must be ({n}, 1): one token per row in use, got {tuple(ids_n1.shape)}")
        live = self.slots[:n]
        if n and max(live) >= self.max_len:
            raise ValueError(f"a row reached the model's context of {self.max_len} positions")
        B = next(b for b in row_buckets(self.rows) if b >= n)
        ids_B1 = ids_n1 if B == n else torch.cat([ids_n1, ids_n1.new_zeros(B - n, 1)])
        # a padding row writes slot 0 of a free row
        slot_B1 = torch.tensor(live + [0] * (B - n), dtype=torch.long, device=self._device).view(B, 1)
        real_B1 = self._real.get((B, n))
        if real_B1 is None:
            real_B1 = self._real[(B, n)] = torch.arange(B, device=self._device).unsqueeze(1) < n
        return B, ids_B1, slot_B1, real_B1, live

    def step(self, ids_n1: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        """One token for each of the n rows in use: (logits (n, V), {MoE layer: (E,) counts})."""
        B, ids_B1, slot_B1, real_B1, live = self._decode_inputs(ids_n1)
        slots_L = self._arange[:max(live, default=0) + 1]
        key = (B, ids_n1.dtype, torch.is_inference_mode_enabled())
        if not self._graphs.has(key):  # L is dynamic in the graph: marked once, for its first compile
            torch._dynamo.mark_dynamic(slots_L, 0)
        logits_BV, counts = self._graphs(key, self.model, ids_B1, slot_B1, real_B1, slots_L, self.k, self.v)
        self.slots[:self.n] = [s + 1 for s in live]
        self.steps += 1
        return logits_BV[:self.n], counts

