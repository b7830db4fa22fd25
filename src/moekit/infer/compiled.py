"""A compiled decode step: one new token per row through the whole model as one inductor graph.

Legend: B batch, S prompt length, L key slots of the static cache, h cached heads, d head dim, V vocabulary.

A small model's eager decode step is per-call overhead (~3 us per aten call here, ~500 calls a token), not
arithmetic. :class:`CompiledDecoder` traces the model's own modules (the same parameters, nothing copied)
for a single-token step over a :class:`StaticKVCache`: per-layer key/value buffers of a fixed length L,
written in place at a slot passed as a tensor, and a key mask that admits only the slots written so far.
Every step then has the same shapes, so one graph serves a whole generation (one compile per batch size
and cache length; L is rounded up to a power of two so that generations of similar lengths share it), and
the routed experts run as fused gathered reductions (:func:`moekit.ops.grouped_ffn.grouped_ffn`) with no
host sync. The prefill stays eager (its length varies); its cache is copied into the static buffers once.

The logits equal the eager step's to rounding, not bit for bit: the compiler sums in its own order.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from moekit.nn.attention import KVCache
from moekit.nn.rope import rope_tables
from moekit.nn.transformer import MoETransformer

__all__ = ["CompiledDecoder", "DecodeRows", "DecodeState", "StaticKVCache", "chunk_step", "decode_step", "rows_step",
           "static_length"]

MIN_SLOTS = 64
MAX_GRAPHS = 64  # compiled decode graphs one process may hold (models x batch sizes x lengths)


def static_length(n: int, max_len: int) -> int:
    """The cache length for ``n`` positions: the next power of two >= n (at least MIN_SLOTS), at most
    ``max_len`` (the model's limit, which ``n`` never exceeds)."""
    return min(max(MIN_SLOTS, 1 << (max(n, 1) - 1).bit_length()), max(max_len, n))


class StaticKVCache:
    """What attention modules call on a cache (``update``), over fixed buffers: layer i's new keys and values
    (B, h, 1, d) go to slot ``slot`` (a 1-element int64 tensor) of ``k[i]`` / ``v[i]`` (B, h, L, d), and the
    whole buffers come back; the caller's mask hides the slots not yet written. Sliding-window layers keep
    every slot too (the mask applies the window)."""

    def __init__(self, k: list[Tensor], v: list[Tensor], slot_1: Tensor):
        self.k, self.v, self.slot_1 = k, v, slot_1

    def update(self, layer: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        self.k[layer].index_copy_(2, self.slot_1, k_new)
        self.v[layer].index_copy_(2, self.slot_1, v_new)
        return self.k[layer], self.v[layer]


def _through_layers(model: MoETransformer, ids_BS: Tensor, pos_BS: Tensor, slot_BS: Tensor, key_mask_BL: Tensor,
                    cache, token_mask_BS: Tensor | None) -> tuple[Tensor, dict[int, Tensor]]:
    """(hidden states (B, S, D) before the head, {MoE layer: (E,) counts}) of the queries the compiled steps
    share: ``slot_BS`` each query's own slot (its key sees the slots up to it that ``key_mask_BL`` admits, and
    a window's last ``w``), ``pos_BS`` its RoPE position."""
    B, L = key_mask_BL.shape
    S = ids_BS.shape[1]
    x = model.embed_tokens(ids_BS)
    cos, sin = (t.unsqueeze(1) for t in rope_tables(pos_BS, model.config, x.dtype))  # (B, 1, S, d)
    slots_L = torch.arange(L, device=ids_BS.device)
    back_BSL = slot_BS.unsqueeze(-1) - slots_L  # how far back each key is from each query
    seen_BSL = key_mask_BL.unsqueeze(1) & (back_BSL >= 0)
    masks = {w: (seen_BSL if w is None else seen_BSL & (back_BSL < w)).view(B, 1, S, L)
             for w in {b.window for b in model.layers}}
    counts: dict[int, Tensor] = {}
    for block in model.layers:
        x, moe_out = block(x, cos, sin, masks[block.window], token_mask_BS, cache, ids_BS)
        if moe_out is not None:
            counts[block.idx] = moe_out.stats.tokens_per_expert
    return x, counts


def decode_step(model: MoETransformer, ids_B1: Tensor, slot_1: Tensor, pos_B1: Tensor, key_mask_BL: Tensor,
                k: list[Tensor], v: list[Tensor]) -> tuple[Tensor, dict[int, Tensor]]:
    """(logits (B, V) of the next token after ``ids_B1``, {MoE layer index: (E,) assignments each expert
    computed}). The new keys go to slot ``slot_1``; ``pos_B1`` are the RoPE positions (real tokens before
    it: left padding does not count); ``key_mask_BL`` is False on padded slots. The forward of
    :class:`MoETransformer` for one query, with static shapes; of the layers' statistics only the counts
    are returned, so the compiler drops the rest (balancing terms, entropies)."""
    x, counts = _through_layers(model, ids_B1, pos_B1, slot_1.view(1, 1), key_mask_BL, StaticKVCache(k, v, slot_1), None)
    return model.head(x)[:, -1], counts


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


class DecodeState:
    """One generation's static cache and counters: ``slot_1`` the next slot, ``pos_B1`` each row's next RoPE
    position, ``key_mask_BL``; :meth:`advance` moves them one token on."""

    def __init__(self, k: list[Tensor], v: list[Tensor], slot: int, pos_B1: Tensor, key_mask_BL: Tensor):
        self.k, self.v = k, v
        self.slot = slot  # mirrored on the host: no sync to check it
        self.slot_1 = torch.tensor([slot], device=pos_B1.device)
        self.pos_B1, self.key_mask_BL = pos_B1, key_mask_BL

    @property
    def length(self) -> int:
        return self.key_mask_BL.shape[1]

    def advance(self) -> None:
        self.slot += 1
        self.slot_1.add_(1)
        self.pos_B1.add_(1)


def _check_compilable(model: MoETransformer) -> None:
    if model.training:
        raise ValueError("the compiled decode step runs in eval mode: call model.eval() first (training routers "
                         "draw noise and the step would not match)")
    for m in model.moe_layers():
        if m.expert_parallel or not hasattr(m.experts, "w_up"):
            raise ValueError("the compiled decode step needs the routed experts resident in this process "
                             "(not offloaded, quantized or spread over ranks); decode without compiling")


class _Graphs:
    """One function under ``torch.compile`` and the seconds spent compiling its graphs (first calls of a key)."""

    def __init__(self, fn):
        self._fn = torch.compile(fn, fullgraph=True, dynamic=False)
        self._seen: set[tuple] = set()
        self.compile_s = 0.0

    def has(self, key: tuple) -> bool:
        return key in self._seen

    def __call__(self, key: tuple, *args):
        if key in self._seen:
            # the callers pass the same model and buffers every time and check the shapes themselves: only
            # the guards that tell this function's graphs apart are evaluated (all of them: ~200 us a call
            # at 4 graphs, 10% of a 4-row step of the default LM)
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return self._fn(*args)
        t0 = time.perf_counter()
        try:
            # each (model, batch size, length) is one more graph of the same function: a process that
            # decodes with several models must not hit dynamo's default of 8 (scoped to this call)
            with torch._dynamo.config.patch(recompile_limit=MAX_GRAPHS):
                out = self._fn(*args)
        except Exception as e:  # the compiler met code it cannot trace: name it, offer the way on
            raise ValueError(f"this model's decode step does not compile ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); decode without compiling") from e
        self._seen.add(key)
        self.compile_s += time.perf_counter() - t0
        return out


class CompiledDecoder:
    """``dec = CompiledDecoder(model)``; after an eager prefill into a :class:`KVCache`,
    ``state = dec.start(cache, attention_mask, total)`` and then
    ``logits_BV, counts = dec.step(ids_B1, state)`` per token. ``compile_s`` adds up the seconds spent
    compiling (first calls of new shapes); ``steps`` counts the steps run."""

    def __init__(self, model: MoETransformer):
        _check_compilable(model)
        self.model = model
        self.steps = 0  # steps decoded, warm-up included
        self._graphs = _Graphs(decode_step)

    @property
    def compile_s(self) -> float:
        return self._graphs.compile_s

    def warm_up(self, batch: int, total: int) -> float:
        """Compile now the graph a generation of ``batch`` rows and ``total`` positions will use (one
        throwaway step after a one-token prefill), so that no timed step compiles. Returns the seconds."""
        t0 = time.perf_counter()
        ids_B1 = torch.zeros(batch, 1, dtype=torch.long, device=self.model.embed.weight.device)
        cache = self.model.new_kv_cache()
        self.model(ids_B1, kv_cache=cache, logits_to_keep=1)
        self.step(ids_B1, self.start(cache, None, total))
        return time.perf_counter() - t0

    def start(self, cache: KVCache, attention_mask_BS: Tensor | None, total: int) -> DecodeState:
        """The static cache for a generation of ``total`` positions, filled from the prefill's ``cache``."""
        S = cache.length
        B = cache.k[0].shape[0]
        L = static_length(total, self.model.config.max_seq_len)
        k, v = [], []
        for ki, vi in zip(cache.k, cache.v):
            kept = ki.shape[2]  # a window layer kept only its last keys: they sit at the last slots
            kb, vb = (t.new_zeros(t.shape[0], t.shape[1], L, t.shape[3]) for t in (ki, vi))
            kb[:, :, S - kept:S].copy_(ki)
            vb[:, :, S - kept:S].copy_(vi)
            k.append(kb)
            v.append(vb)
        key_mask_BL = torch.ones(B, L, dtype=torch.bool, device=k[0].device)
        if attention_mask_BS is not None:
            key_mask_BL[:, :S] = attention_mask_BS.bool()
            pos_B1 = attention_mask_BS.long().sum(1, keepdim=True)
        else:
            pos_B1 = torch.full((B, 1), S, dtype=torch.long, device=k[0].device)
        return DecodeState(k, v, S, pos_B1, key_mask_BL)

    def step(self, ids_B1: Tensor, state: DecodeState) -> tuple[Tensor, dict[int, Tensor]]:
        """:func:`decode_step` for ``ids_B1`` at the state's next slot: (logits (B, V), {MoE layer: (E,)
        counts}); advances the state."""
        if state.slot >= state.length:
            raise ValueError(f"the static cache holds {state.length} positions; start() it with a larger total")
        key = (tuple(ids_B1.shape), state.length, ids_B1.dtype, torch.is_inference_mode_enabled())
        out = self._graphs(key, self.model, ids_B1, state.slot_1, state.pos_B1, state.key_mask_BL, state.k, state.v)
        state.advance()
        self.steps += 1
        return out


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
        self._graphs = _Graphs(rows_step)
        self._chunk_graph = _Graphs(chunk_step)

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
        n, start = ids_n.shape[0], self.staged
        if not 0 < n <= self.chunk:
            raise ValueError(f"stage() takes 1 to chunk={self.chunk} tokens, got {n}")
        if start + n > self.max_len:
            raise ValueError(f"the prompt passes the model's context of {self.max_len} positions")
        ids_1C = ids_n.new_zeros(1, self.chunk)
        ids_1C[0, :n] = ids_n
        dev = ids_n.device
        slots_L = self._arange[:start + self.chunk + 1]  # never L == C: that would fix L
        key = (self.chunk, ids_n.dtype, torch.is_inference_mode_enabled())
        if not self._chunk_graph.has(key):
            torch._dynamo.mark_dynamic(slots_L, 0)
        out = self._chunk_graph(key, self.model, ids_1C, torch.tensor([start], device=dev),
                                torch.tensor([n], device=dev), slots_L, self.k, self.v, self.rows)
        self.staged += n
        return out

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

    def step(self, ids_n1: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        """One token for each of the n rows in use: (logits (n, V), {MoE layer: (E,) counts})."""
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
        slots_L = self._arange[:max(live, default=0) + 1]
        key = (B, ids_n1.dtype, torch.is_inference_mode_enabled())
        if not self._graphs.has(key):  # L is dynamic in the graph: marked once, for its first compile
            torch._dynamo.mark_dynamic(slots_L, 0)
        logits_BV, counts = self._graphs(key, self.model, ids_B1, slot_B1, real_B1, slots_L, self.k, self.v)
        self.slots[:n] = [s + 1 for s in live]
        self.steps += 1
        return logits_BV[:n], counts
