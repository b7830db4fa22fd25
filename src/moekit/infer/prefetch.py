"""Prefetch: while MoE layer l runs, load the experts layer l+1 will most likely need, on the loader thread.

Legend: T tokens, D model dim, E experts.

The prediction applies layer l+1's FFN norm and router to the residual stream that enters layer l's FFN
(captured by a forward pre-hook on layer l's ``ffn_norm``); it runs right after layer l has pinned its
own experts, so the prefetches queue behind layer l's misses and can never evict them. The experts with
the largest summed routing weight over the call's tokens are prefetched, up to ``max_experts``. The
first MoE layer (and one after a dense layer) is predicted from its own block's input, before attention.
Accuracy (recall and precision of the predicted sets) is counted by the cache per layer.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch
from torch import Tensor, nn

from moekit.functional import routing as R
from moekit.infer.cache import Trace
from moekit.infer.offload import ExpertCache

__all__ = ["Prefetcher", "oracle_predictor"]


class Prefetcher:
    """While MoE layer l runs, queue the experts layer l+1 will most likely need: layer l+1's FFN norm and
    router applied to the residual stream entering layer l's FFN; the experts with the largest summed
    routing weight, at most ``max_experts`` per layer (default: the capacity shared by the MoE layers,
    at least top-k). The first MoE layer (and one after a dense layer) is predicted from its own
    block's input, before its attention."""

    def __init__(self, model: nn.Module, cache: ExpertCache, max_experts: int | None = None,
                 predictor: Callable[[nn.Module, Tensor], list[int]] | None = None):
        self.cache, self.predictor = cache, predictor
        blocks = list(model.layers)
        moe = {b.idx for b in blocks if b.is_moe}
        k = max(b.ffn.cfg.top_k for b in blocks if b.is_moe)
        self.max_experts = max_experts or max(k, cache.capacity // max(len(moe), 1))
        self._x: dict[int, Tensor] = {}
        self._handles = []
        self._experts = [b.ffn.experts for b in blocks if b.is_moe]
        for b in blocks:
            if not b.is_moe:
                continue
            j, prev = b.idx, (blocks[b.idx - 1] if b.idx > 0 else None)
            if prev is not None and prev.is_moe:
                self._handles.append(prev.ffn_norm.register_forward_pre_hook(
                    lambda _m, args, j=j: self._x.__setitem__(j, args[0])))
                prev.ffn.experts.after_acquire = lambda j=j, b=b: self._predict(b, self._x.pop(j, None))
            else:
                self._handles.append(b.attn_norm.register_forward_pre_hook(
                    lambda _m, args, b=b: self._predict(b, args[0])))

    @torch.no_grad()
    def _predict(self, block: nn.Module, x: Tensor | None) -> None:
        if x is None:
            return
        if self.predictor is not None:
            self.cache.prefetch(block.idx, sorted(self.predictor(block, x)))
            return
        layer = block.ffn
        h_TD = block.ffn_norm.forward(x).reshape(-1, x.shape[-1])  # .forward: not the capture hook
        a = R.assignments(layer.router(h_TD))
        score_E = torch.zeros(layer.cfg.num_experts, dtype=torch.float32).index_add_(0, a.expert_A, a.weight_A.float())
        top = score_E.topk(min(self.max_experts, int((score_E > 0).sum()))).indices.tolist()
        self.cache.prefetch(block.idx, sorted(top))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for e in self._experts:
            e.after_acquire = None


def oracle_predictor(trace: Trace) -> Callable[[nn.Module, Tensor], list[int]]:
    """A perfect predictor for a rerun of the run that recorded ``trace`` (same model, prompts, settings):
    each layer's next call gets the experts that call accessed. Measures what prefetch can hide at best,
    apart from the router-based prediction's accuracy (``moekit bench generate --prefetch-oracle``)."""
    calls: dict[int, deque] = {}
    group: set[int] = set()
    for kind, layer, expert in trace.events:
        if kind == "a":
            group.add(expert)
        elif kind == "e":
            calls.setdefault(layer, deque()).append(sorted(group))
            group = set()

    def predict(block: nn.Module, _x: Tensor) -> list[int]:
        q = calls.get(block.idx)
        return q.popleft() if q else []

    return predict
