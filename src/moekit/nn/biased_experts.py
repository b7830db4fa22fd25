"""Routed experts with biases and gpt-oss's clamped SwiGLU, swapped in for GroupedExperts by MoELayer.

Legend: T tokens, D model dim, E experts, H expert hidden, A assignments, n rows of one expert.

Expert e computes ``w_down[e] @ act(w_gate[e] @ x + gate_bias[e], w_up[e] @ x + up_bias[e]) + down_bias[e]``
with act = SwiGLU, or, with ``swiglu_limit``, the clamped form of gpt-oss:
  g = min(g, limit);  u = clamp(u, -limit, limit);  act = (u + 1) * g * sigmoid(alpha * g).
The weights keep GroupedExperts' names and layout (w_gate, w_up (E, H, D); w_down (E, D, H)), so
checkpoint code and the expert store read them alike. The forward is the plain per-expert loop, the
readable reference; the fused op (moekit.ops.grouped_ffn) has no bias or clamp.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.nn.init import init_weights_

__all__ = ["BiasedExperts", "add_expert", "clamped_swiglu"]


def clamped_swiglu(g_nH: Tensor, u_nH: Tensor, alpha: float, limit: float) -> Tensor:
    """gpt-oss's gate: (clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g'), g' = min(g, limit)."""
    g_nH = g_nH.clamp(max=limit)
    u_nH = u_nH.clamp(-limit, limit)
    return (u_nH + 1) * (g_nH * torch.sigmoid(alpha * g_nH))


class BiasedExperts(nn.Module):
    """E SwiGLU experts with (optional) biases on all three projections and an optional clamp."""

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, *, bias: bool = True,
                 swiglu_limit: float | None = None, swiglu_alpha: float = 1.702):
        super().__init__()
        E, D, H = num_experts, d_model, d_hidden
        self.limit, self.alpha = swiglu_limit, swiglu_alpha
        self.w_gate = nn.Parameter(torch.empty(E, H, D))
        self.w_up = nn.Parameter(torch.empty(E, H, D))
        self.w_down = nn.Parameter(torch.empty(E, D, H))
        self.gate_bias = nn.Parameter(torch.zeros(E, H)) if bias else None
        self.up_bias = nn.Parameter(torch.zeros(E, H)) if bias else None
        self.down_bias = nn.Parameter(torch.zeros(E, D)) if bias else None
        self.activation = "swiglu"
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        return self.w_up.shape[0]

    def reset_parameters(self, std: float | None = None, out_std: float | None = None) -> None:
        """:func:`moekit.nn.init.init_weights_` (the biases start at 0)."""
        init_weights_(self, std, out_std)

    def forward(self, x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor) -> Tensor:
        """Weighted sum over each token's assignments of its experts' outputs, (T, D); ``expert_A == E``
        marks a dropped assignment (skipped)."""
        out_TD = torch.zeros_like(x_TD)
        for e in expert_A[expert_A < self.num_experts].unique().tolist():
            out_TD = add_expert(self, e, out_TD, x_TD, token_A, expert_A, weight_A)
        return out_TD


def add_expert(bank, e: int, out_TD: Tensor, x_TD: Tensor, token_A: Tensor, expert_A: Tensor,
               weight_A: Tensor) -> Tensor:
    """``out_TD`` plus expert ``e``'s weighted outputs on its assigned tokens. ``bank``: anything with
    BiasedExperts' ``w_gate`` / ``w_up`` / ``w_down`` (indexed by expert), biases, ``limit`` and ``alpha``
    (the offloaded experts pass slot weights: the same arithmetic, so the same bits)."""
    sel_A = expert_A == e
    tok_n = token_A[sel_A]
    x_nD = x_TD[tok_n]
    g_nH, u_nH = x_nD @ bank.w_gate[e].t(), x_nD @ bank.w_up[e].t()
    if bank.gate_bias is not None:
        g_nH, u_nH = g_nH + bank.gate_bias[e], u_nH + bank.up_bias[e]
    h_nH = F.silu(g_nH) * u_nH if bank.limit is None else clamped_swiglu(g_nH, u_nH, bank.alpha, bank.limit)
    y_nD = h_nH @ bank.w_down[e].t()
    if bank.down_bias is not None:
        y_nD = y_nD + bank.down_bias[e]
    return out_TD.index_add(0, tok_n, y_nD * weight_A[sel_A].unsqueeze(1).to(y_nD.dtype))

    def extra_repr(self) -> str:
        E, H, D = self.w_up.shape
        return f"num_experts={E}, d_model={D}, d_hidden={H}, bias={self.gate_bias is not None}, limit={self.limit}"
