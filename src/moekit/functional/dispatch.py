"""Group assignments by expert (sort / permute) and the readable reference expert computation.

Legend: T tokens, D model dim, E experts, H expert hidden, A assignments, n_e assignments of expert e.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.functional.routing import expert_counts

__all__ = ["Dispatch", "sort_by_expert", "activation_fn", "expert_ffn", "loop_experts_reference"]


@dataclass
class Dispatch:
    """Assignments sorted by expert so that each expert's tokens are one contiguous run."""

    token_A: Tensor  # int64 (A,): token of each sorted assignment
    weight_A: Tensor  # (A,): combine weight, differentiable
    counts: list[int]  # n_e for every expert, on the host (sum = A)
    counts_E: Tensor  # the same on the device


def sort_by_expert(token_A: Tensor, expert_A: Tensor, weight_A: Tensor, num_experts: int) -> Dispatch:
    """1. one stable sort by expert id; 2. per-expert counts (the one host sync of the layer).

    An assignment with expert id E (dropped by the capacity limit) sorts last and is left out."""
    order_A = expert_A.argsort(stable=True)
    counts_E = expert_counts(expert_A, num_experts)
    counts = counts_E.tolist()
    kept_A = order_A[:sum(counts)]
    return Dispatch(token_A[kept_A], weight_A[kept_A], counts, counts_E)


def activation_fn(name: str):
    return {"swiglu": F.silu, "gelu": F.gelu, "relu": F.relu}[name]


def expert_ffn(x_ND: Tensor, w_gate_HD: Tensor | None, w_up_HD: Tensor, w_down_DH: Tensor, activation: str) -> Tensor:
    """One expert: w_down @ (act(w_gate @ x) * (w_up @ x)) for swiglu, w_down @ act(w_up @ x) otherwise."""
    act = activation_fn(activation)
    if w_gate_HD is not None:
        h_NH = act(x_ND @ w_gate_HD.t()) * (x_ND @ w_up_HD.t())
    else:
        h_NH = act(x_ND @ w_up_HD.t())
    return h_NH @ w_down_DH.t()


def loop_experts_reference(x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor,
                           w_gate: Tensor | None, w_up: Tensor, w_down: Tensor, activation: str) -> Tensor:
    """Readable reference: a Python loop over experts with boolean masks and index_add.

    out_t = sum over assignments (t, e, w) of w * expert_e(x_t). Differentiable by plain autograd.
    """
    out_TD = torch.zeros_like(x_TD)
    for e in range(w_up.shape[0]):
        sel = expert_A == e
        if not bool(sel.any()):
            continue
        tok = token_A[sel]
        y = expert_ffn(x_TD[tok], None if w_gate is None else w_gate[e], w_up[e], w_down[e], activation)
        out_TD = out_TD.index_add(0, tok, y * weight_A[sel].unsqueeze(1).to(y.dtype))
    return out_TD
