"""Offloaded biased experts (gpt-oss): :class:`moekit.nn.biased_experts.BiasedExperts` with its weight
matrices in the expert cache's slots and its biases resident.

The forward is BiasedExperts' own per-expert loop (``add_expert``) over slot weights, in the same expert
order, so the outputs are bit-identical to the resident model's. A call that needs more experts than the
cache holds (a long prefill on a small budget) runs them in chunks of the capacity; each expert's output
is added on its own, so the chunks change nothing.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.infer.offload import ExpertCache, _SlotWeights
from moekit.nn.biased_experts import BiasedExperts, add_expert

__all__ = ["OffloadedBiasedExperts"]


class OffloadedBiasedExperts(nn.Module):
    """Drop-in for ``BiasedExperts`` (same ``forward(x_TD, token_A, expert_A, weight_A)``) whose weight
    matrices are fetched from an :class:`ExpertCache`; the biases (small) are taken from ``resident``."""

    def __init__(self, layer: int, cache: ExpertCache, resident: BiasedExperts):
        super().__init__()
        E, H, D = resident.w_up.shape
        self.layer, self.cache, self._E = layer, cache, E
        self.w_gate = _SlotWeights(cache, layer, "w_gate", (E, H, D))
        self.w_up = _SlotWeights(cache, layer, "w_up", (E, H, D))
        self.w_down = _SlotWeights(cache, layer, "w_down", (E, D, H))
        self.gate_bias, self.up_bias, self.down_bias = resident.gate_bias, resident.up_bias, resident.down_bias
        self.limit, self.alpha, self.activation = resident.limit, resident.alpha, "swiglu"
        self.after_acquire = None  # the Prefetcher's hook: called once this call's experts are pinned

    @property
    def num_experts(self) -> int:
        return self._E

    def forward(self, x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x_TD.requires_grad:
            raise RuntimeError("OffloadedBiasedExperts is inference-only: run under torch.no_grad()")
        needed = expert_A[expert_A < self._E].unique().tolist()
        cap = self.cache.capacity
        out_TD = torch.zeros_like(x_TD)
        for i in range(0, len(needed), cap):
            chunk = needed[i:i + cap]
            self.cache.acquire(self.layer, chunk)
            if self.after_acquire is not None and i + cap >= len(needed):
                self.after_acquire()  # queue the next layer's likely experts behind this call's misses
            try:
                for e in chunk:
                    out_TD = add_expert(self, e, out_TD, x_TD, token_A, expert_A, weight_A)
            finally:
                self.cache.end_group(self.layer)
        return out_TD

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self._E}, biased, limit={self.limit}, offloaded"
