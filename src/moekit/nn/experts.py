"""Routed experts stored as stacked 3-D tensors, and the dense (shared-expert) MLP.

Legend: T tokens, D model dim, E experts, H expert hidden, A assignments.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.functional.dispatch import activation_fn, loop_experts_reference
from moekit.nn.init import init_weights_
from moekit.nn.linear import Linear
from moekit.ops.grouped_ffn import grouped_ffn

__all__ = ["GroupedExperts", "MLP"]


class GroupedExperts(nn.Module):
    """E expert FFNs: ``w_gate``, ``w_up`` (E, H, D) and ``w_down`` (E, D, H), nn.Linear layout.

    Expert e computes ``w_down[e] @ (silu(w_gate[e] @ x) * (w_up[e] @ x))`` (swiglu) or
    ``w_down[e] @ act(w_up[e] @ x)`` (gelu, relu; ``w_gate`` is None).
    """

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, activation: str = "swiglu",
                 impl: str = "fused"):
        super().__init__()
        E, D, H = num_experts, d_model, d_hidden
        self.activation = activation
        self.impl = impl
        self.w_gate = nn.Parameter(torch.empty(E, H, D)) if activation == "swiglu" else None
        self.w_up = nn.Parameter(torch.empty(E, H, D))
        self.w_down = nn.Parameter(torch.empty(E, D, H))
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        return self.w_up.shape[0]

    def reset_parameters(self, std: float | None = None, out_std: float | None = None) -> None:
        """:func:`moekit.nn.init.init_weights_` (default: N(0, 1/sqrt(fan_in)) for each projection)."""
        init_weights_(self, std, out_std)

    def forward(self, x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor) -> Tensor:
        """Weighted sum over each token's assignments of its experts' outputs. Returns (T, D).

        token_A, expert_A, weight_A: (A,) in any order; ``expert_A == E`` marks a dropped assignment.
        The fused path is one custom op with static shapes (``torch.compile`` traces it whole)."""
        if self.impl == "loop":
            keep_A = expert_A < self.num_experts
            return loop_experts_reference(x_TD, token_A[keep_A], expert_A[keep_A], weight_A[keep_A], self.w_gate,
                                          self.w_up, self.w_down, self.activation)
        return grouped_ffn(x_TD, token_A, expert_A, weight_A, self.w_gate, self.w_up, self.w_down, self.activation)

    def extra_repr(self) -> str:
        E, H, D = self.w_up.shape
        return f"num_experts={E}, d_model={D}, d_hidden={H}, activation={self.activation!r}"


class MLP(nn.Module):
    """Dense FFN (shared experts, dense layers): SwiGLU or a plain activation MLP."""

    def __init__(self, d_model: int, d_hidden: int, activation: str = "swiglu"):
        super().__init__()
        self.activation = activation
        self.gate_proj = Linear(d_model, d_hidden, bias=False) if activation == "swiglu" else None
        self.up_proj = Linear(d_model, d_hidden, bias=False)
        self.down_proj = Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = activation_fn(self.activation)
        if self.gate_proj is not None:
            return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(act(self.up_proj(x)))
