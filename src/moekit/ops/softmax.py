"""Softmax over a short last dimension (a router's few experts), fast on the CPU.

Why: aten's CPU softmax vectorises along the last dimension; below one vector of floats (16 on
AVX-512) it falls to a slow path. Measured at 2,048 rows, 1 thread: 321 us forward for 8 experts
against 71 us for 16, and 530 against 168 with the backward. The same maths as four whole-tensor
kernels (max, exp, sum, divide) take ~100 us, and the backward p * (g - <g, p>) three more. Above
the threshold, for a few rows (decode steps), off the CPU and inside a compiled graph (where inductor
fuses its own), aten's kernel is used.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["router_softmax", "MIN_ROWS", "SHORT_ROW"]

# rows shorter than this take the whole-tensor kernels: aten's vectorised path starts at one
# AVX-512 vector of fp32 (and is 2-3x faster than these kernels from there on)
SHORT_ROW = 16
# and only for this many rows or more: below, the autograd Function's ~9 us a call costs more than aten's
# slow path saves (a decode step's 1-4 rows: 11 us against 1.5-2; 256 rows: 19 against 38)
MIN_ROWS = 128


class _ShortSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        e = (z - z.amax(dim=-1, keepdim=True)).exp_()
        p = e.div_(e.sum(dim=-1, keepdim=True))
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (p,) = ctx.saved_tensors
        gp = g * p
        return gp.sub_(p * gp.sum(dim=-1, keepdim=True))


def router_softmax(z: Tensor) -> Tensor:
    """``z.softmax(dim=-1)``, equal to rounding (a few ulp)."""
    E = z.shape[-1]
    if E >= SHORT_ROW or z.numel() < MIN_ROWS * max(E, 1) or z.device.type != "cpu" \
            or torch.compiler.is_compiling():
        return z.softmax(dim=-1)
    return _ShortSoftmax.apply(z)
