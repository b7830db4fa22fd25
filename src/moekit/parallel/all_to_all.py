"""Differentiable ``all_to_all_single`` with variable splits, and the meter that counts its traffic.

Legend: R rows (tokens) in, R' rows out, D row width. A rank sends ``in_splits[j]`` rows to rank j
and receives ``out_splits[j]`` rows from it; the backward pass is the same exchange reversed.

Why our own autograd.Function: ``torch.distributed.nn.functional.all_to_all_single`` is deprecated in
torch 2.13, and the traffic of the backward exchange must be metered too (it happens after the
layer's forward has returned, so it cannot be returned in the layer's stats).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from moekit.parallel.groups import collective

__all__ = ["CommMeter", "all_to_all", "exchange_counts"]


@dataclass
class CommMeter:
    """Running totals of one rank's all-to-all traffic; the trainer reads and resets it every step.

    ``bytes_sent`` counts the token rows (D-wide activations forward, their gradients backward) sent to
    *other* ranks, rows x D x element size (rows a rank keeps never touch the network); the per-expert
    counts exchanged before each dispatch (W x L integers) are bookkeeping, in ``calls`` and ``seconds``
    but not in the bytes, so the bytes are exactly what routing sends;
    ``seconds`` is the wall time inside the blocking collective (gloo on CPU is synchronous; on CUDA
    with NCCL it is the launch time unless the caller synchronises).
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    calls: int = 0

    def reset(self) -> dict[str, float]:
        """Return the totals as a dict and zero them."""
        out = {"a2a_bytes_sent": self.bytes_sent, "a2a_bytes_received": self.bytes_received,
               "a2a_seconds": self.seconds, "a2a_calls": self.calls}
        self.bytes_sent = self.bytes_received = self.calls = 0
        self.seconds = 0.0
        return out


def _exchange(x_RD: Tensor, out_splits: list[int], in_splits: list[int], group: Any,
              meter: CommMeter | None, *, rows: bool = True) -> Tensor:
    x_RD = x_RD.contiguous()
    out_RD = x_RD.new_empty((sum(out_splits), *x_RD.shape[1:]))
    me = dist.get_rank(group)
    t0 = time.perf_counter()
    collective("expert-parallel all-to-all",
               lambda: dist.all_to_all_single(out_RD, x_RD, out_splits, in_splits, group=group))
    if meter is not None:
        meter.seconds += time.perf_counter() - t0
        meter.calls += 1
        if rows:  # token rows; not the counts exchange (see CommMeter)
            row = math.prod(x_RD.shape[1:]) * x_RD.element_size()
            meter.bytes_sent += (sum(in_splits) - in_splits[me]) * row
            meter.bytes_received += (sum(out_splits) - out_splits[me]) * row
    return out_RD


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD, out_splits, in_splits, group, meter):
        ctx.splits = (out_splits, in_splits)
        ctx.group, ctx.meter = group, meter
        return _exchange(x_RD, out_splits, in_splits, group, meter)

    @staticmethod
    def backward(ctx, grad_out):
        out_splits, in_splits = ctx.splits
        # the gradient of a row goes back to the rank it came from: the same exchange, reversed
        return _exchange(grad_out, in_splits, out_splits, ctx.group, ctx.meter), None, None, None, None


def all_to_all(x_RD: Tensor, out_splits: list[int], in_splits: list[int], group: Any,
               meter: CommMeter | None = None) -> Tensor:
    """Send rows ``x_RD`` split by ``in_splits`` to the ranks of ``group``; receive ``out_splits`` rows.

    Differentiable: backward sends each row's gradient back to its sender. Every rank of the group
    must call it (forward and backward) in the same order.
    """
    return _AllToAll.apply(x_RD, out_splits, in_splits, group, meter)


def exchange_counts(send_WL: Tensor, group: Any, meter: CommMeter | None = None) -> Tensor:
    """send_WL[j, e]: rows for local expert e of rank j -> recv_WL[i, e]: rows rank i sends to my expert e."""
    W = send_WL.shape[0]
    return _exchange(send_WL.contiguous(), [1] * W, [1] * W, group, meter, rows=False)
