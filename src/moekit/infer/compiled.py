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

Attention stays ``scaled_dot_product_attention`` inside the graph. Writing one query's attention as
reductions the compiler fuses made a 1-row step of the default LM 0.47-0.53 -> 0.43-0.44 ms measured alone,
but ``generate --compile`` end to end no faster (400 tokens, 1 thread, three alternating runs: 1,367-1,512
tokens/s against 1,446-1,602), so it was not kept.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from moekit.nn.attention import KVCache
from moekit.nn.rope import rope_tables
from moekit.nn.transformer import MoETransformer

__all__ = ["CompiledDecoder", "DecodeState", "StaticKVCache", "decode_step", "static_length"]

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
    """One function under ``torch.compile`` and the seconds spent compiling its graphs (first calls of a key).

    On the CPU the graphs are built with inductor's C++ wrapper: the ~50 kernel calls of a step are made from
    C++ with the interpreter lock released, not from a generated Python function (default LM, 1 thread: a
    1-row step 0.47 -> 0.37 ms, a 4-row one 0.90 -> 0.81 ms, ``generate --compile`` 0.57 -> 0.45 ms a token,
    two alternating runs each; compiling takes ~25% longer)."""

    def __init__(self, fn, device: torch.device):
        options = {"cpp_wrapper": True} if device.type == "cpu" else None
        self._fn = torch.compile(fn, fullgraph=True, dynamic=False, options=options)
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
        self._graphs = _Graphs(decode_step, model.embed.weight.device)

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
