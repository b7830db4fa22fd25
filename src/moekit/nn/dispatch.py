"""Token dispatchers: how an MoE layer's assignments reach its experts and come back combined.

Legend: n rows (tokens) of this call, D model dim, E experts, A assignments.

An :class:`MoELayer` always holds one dispatcher and calls it the same way. The local dispatcher here
runs every expert in this process; ``moekit.parallel`` provides the all-to-all dispatcher that sends
each expert's rows to the rank that holds it. A dispatcher is not an ``nn.Module``: it has no
parameters, and swapping it changes where experts run, not what they compute.
"""
from __future__ import annotations

from typing import Protocol

from torch import Tensor

from moekit.nn.experts import GroupedExperts

__all__ = ["Dispatcher", "LocalDispatcher"]


class Dispatcher(Protocol):
    """``dispatcher(x_nD, token_A, expert_A, weight_A, experts) -> (y_nD, counts_E | None)``.

    ``y_nD[t] = sum over assignments a of token t of weight_A[a] * expert_{expert_A[a]}(x_nD[t])``;
    ``expert_A == E`` marks an assignment dropped by the capacity limit (it contributes nothing).
    ``counts_E`` are the assignments each expert computed when the dispatcher had to count them
    anyway, else None (the layer counts them only when its statistics are read).
    """

    expert_parallel: bool  # True when some of the layer's experts live in other processes

    def __call__(self, x_nD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor,
                 experts: GroupedExperts) -> tuple[Tensor, Tensor | None]: ...


class LocalDispatcher:
    """Every expert in this process: one fused op with static shapes (gather, experts, weighted combine).

    The sort and the per-expert counts happen inside the op, so ``torch.compile`` traces the layer
    without graph breaks, dropless and with a capacity limit alike."""

    expert_parallel = False

    def __call__(self, x_nD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor,
                 experts: GroupedExperts) -> tuple[Tensor, Tensor | None]:
        return experts(x_nD, token_A, expert_A, weight_A), None

    def __repr__(self) -> str:
        return "LocalDispatcher()"

