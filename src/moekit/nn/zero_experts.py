"""Zero-computation experts (MoE++, arXiv 2410.07348; LongCat-Flash): routed like experts, no matmul.

Legend: n rows (tokens), D model dim, A assignments, C constant experts.

Expert ids after the E routed ones: null (AdaMoE) and zero experts output 0 and are not computed at all;
copy experts output their input, E(x) = x; constant experts output E(x) = a1 x + a2 v with
[a1, a2] = softmax(W_c x) and v learnable, one (W_c, v) per constant expert.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.nn.init import init_weights_

__all__ = ["ZeroComputeExperts"]


class ZeroComputeExperts(nn.Module):
    """The copy and constant experts' share of the output: ``y_n = sum over assignments a of token n to
    such an expert of weight_a * E(x_n)``. Parameters: ``const_gate`` (C, 2, D) = W_c, ``const_vector``
    (C, D) = v (None without constant experts)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        E, D = cfg.num_experts, cfg.d_model
        self.first_copy = E + cfg.num_null_experts + cfg.num_zero_experts
        self.num_copy = cfg.num_copy_experts
        self.first_constant = self.first_copy + self.num_copy
        C = cfg.num_constant_experts
        self.num_constant = C
        self.const_gate = nn.Parameter(torch.empty(C, 2, D)) if C else None
        self.const_vector = nn.Parameter(torch.empty(C, D)) if C else None
        init_weights_(self)

    def forward(self, x_nD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor) -> Tensor:
        """(n, D) in the dtype of ``x_nD``; shapes stay static (every assignment is computed, masked)."""
        x_AD = x_nD[token_A]
        w_A = weight_A.to(x_nD.dtype)
        copy_A = (expert_A >= self.first_copy) & (expert_A < self.first_constant)
        y_AD = torch.where(copy_A, w_A, 0).unsqueeze(1) * x_AD
        if self.num_constant:
            j_A = (expert_A - self.first_constant).clamp(0, self.num_constant - 1)
            const_A = (expert_A >= self.first_constant) & (expert_A < self.first_constant + self.num_constant)
            # a = softmax(W_c x) per assignment: "a" assignments, "c" the two coefficients, "d" model dim
            a_A2 = torch.einsum("ad,acd->ac", x_AD, self.const_gate.to(x_nD.dtype)[j_A]).softmax(dim=-1)
            out_AD = a_A2[:, :1] * x_AD + a_A2[:, 1:] * self.const_vector.to(x_nD.dtype)[j_A]
            y_AD = y_AD + torch.where(const_A, w_A, 0).unsqueeze(1) * out_AD
        return torch.zeros_like(x_nD).index_add(0, token_A, y_AD)

    def extra_repr(self) -> str:
        return f"copy={self.num_copy}, constant={self.num_constant}"
