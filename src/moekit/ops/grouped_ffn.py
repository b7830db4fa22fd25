"""Fused grouped expert FFN with combine: one autograd op for gather -> experts -> weighted scatter.

Legend: T tokens, D model dim, E experts, H expert hidden, A assignments sorted by expert,
n_e rows of expert e (a contiguous run of A).

Why a custom autograd.Function (and not plain autograd over a loop):
- it saves only the sorted token indices, the combine weights and the two (A, H) pre-activations;
  the gathered input (A, D) and the expert outputs (A, D) are re-gathered / never needed, so the
  activation memory is below that of a dense FFN of the same active width;
- the expert weight gradients are written into one preallocated (E, ...) tensor per weight, once,
  instead of autograd accumulating a full-size zero-padded gradient per expert (cost ~E^2);
- the gradient of each combine weight is <g_t, y_a> = <g_t @ w_down, h_a>, computed from the
  backward's own matmul, so the expert outputs need not be stored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


__all__ = ["grouped_ffn_combine"]


def _act(name: str, z: Tensor) -> Tensor:
    if name == "swiglu":
        return F.silu(z)
    if name == "gelu":
        return F.gelu(z)
    return F.relu(z)


def _act_backward(name: str, grad: Tensor, z: Tensor) -> Tensor:
    """grad * act'(z) for the ungated activations, with aten's fused kernels."""
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, z)
    return torch.ops.aten.threshold_backward(grad, z, 0)


def _runs(counts: list[int]) -> list[tuple[int, slice]]:
    """(expert, row slice) for every expert with at least one row; rows are grouped by expert.

    The loops over these runs stay serial, each matmul using all intra-op threads: spreading whole
    experts over single-threaded workers was measured slower on an idle 2-core AVX-512 machine
    (shape B forward 0.65x vs 0.74x of dense), though faster when other processes compete for the cores.
    """
    runs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            runs.append((e, slice(start, start + n)))
        start += n
    return runs


def _expert_grad_buffer(w: Tensor, counts: list[int]) -> Tensor:
    """Uninitialised (E, ...) gradient; only experts that received no rows are zeroed (the others are
    overwritten by their matmul), so no pass over the whole weight-sized buffer is spent on zeros."""
    g = torch.empty_like(w)
    for e, n in enumerate(counts):
        if n == 0:
            g[e].zero_()
    return g


class _GroupedFFNCombine(torch.autograd.Function):
    """Per-expert work is only matmuls; every elementwise step runs once over all A rows, so the
    number of kernel launches does not grow with E (each launch is a thread barrier on the CPU)."""

    @staticmethod
    def forward(ctx, x_TD, token_A, weight_A, w_gate, w_up, w_down, counts, activation):
        gated = w_gate is not None
        A, H = token_A.numel(), w_up.shape[1]
        # 1. gather every assignment's token once: (A, D), freed after forward
        xs_AD = x_TD.index_select(0, token_A)
        u_AH = x_TD.new_empty(A, H)
        g_AH = x_TD.new_empty(A, H) if gated else None
        # 2. up (and gate) projections: one matmul per expert over its contiguous run
        for e, sl in _runs(counts):
            torch.mm(xs_AD[sl], w_up[e].t(), out=u_AH[sl])
            if gated:
                torch.mm(xs_AD[sl], w_gate[e].t(), out=g_AH[sl])
        del xs_AD
        h_AH = F.silu(g_AH).mul_(u_AH) if gated else _act(activation, u_AH)
        # 3. down projection, then the combine weight and a scatter-add back to token order
        y_AD = x_TD.new_empty(A, x_TD.shape[1])
        for e, sl in _runs(counts):
            torch.mm(h_AH[sl], w_down[e].t(), out=y_AD[sl])
        y_AD.mul_(weight_A.to(y_AD.dtype).unsqueeze(1))
        out_TD = torch.zeros_like(x_TD).index_add_(0, token_A, y_AD)
        ctx.save_for_backward(x_TD, token_A, weight_A, w_gate, w_up, w_down, g_AH, u_AH)
        ctx.counts, ctx.activation = counts, activation
        return out_TD

    @staticmethod
    def backward(ctx, gout_TD):
        x_TD, token_A, weight_A, w_gate, w_up, w_down, g_AH, u_AH = ctx.saved_tensors
        counts, activation = ctx.counts, ctx.activation
        gated = w_gate is not None
        need_x, _, need_w, need_wg, need_wu, need_wd = ctx.needs_input_grad[:6]
        A, H = token_A.numel(), w_up.shape[1]
        w_A1 = weight_A.to(x_TD.dtype).unsqueeze(1)
        gy_AD = gout_TD.index_select(0, token_A)  # dL/dy_a before the combine weight
        # 1. recompute h from the saved pre-activations (cheap, elementwise, all rows at once)
        if gated:
            sg_AH = F.silu(g_AH)
            h_AH = sg_AH * u_AH
        else:
            h_AH = _act(activation, u_AH)
        # 2. dh = gy @ w_down per expert; w_down's gradient uses the weighted gy
        dh_AH = x_TD.new_empty(A, H)
        gyw_AD = gy_AD * w_A1
        dw_down = _expert_grad_buffer(w_down, counts) if need_wd else None
        for e, sl in _runs(counts):
            torch.mm(gy_AD[sl], w_down[e], out=dh_AH[sl])
            if need_wd:
                torch.mm(gyw_AD[sl].t(), h_AH[sl], out=dw_down[e])
        del gy_AD, gyw_AD
        # 3. combine-weight gradient <g_t, y_a> = <g_t @ w_down, h_a>; then through the activation
        gw = torch.linalg.vecdot(dh_AH, h_AH).to(weight_A.dtype) if need_w else None
        del h_AH
        dh_AH.mul_(w_A1)
        # aten's fused activation backward kernels: one pass each instead of a chain of elementwise ops
        if gated:
            du_AH = dh_AH * sg_AH
            del sg_AH
            dg_AH = torch.ops.aten.silu_backward(dh_AH.mul_(u_AH), g_AH)
        else:
            du_AH = _act_backward(activation, dh_AH, u_AH)
            dg_AH = None
        # 4. input-side weight gradients and dx, per expert
        xs_AD = x_TD.index_select(0, token_A)
        dw_gate = _expert_grad_buffer(w_gate, counts) if (gated and need_wg) else None
        dw_up = _expert_grad_buffer(w_up, counts) if need_wu else None
        dx_AD = torch.empty_like(xs_AD) if need_x else None
        for e, sl in _runs(counts):
            if need_wu:
                torch.mm(du_AH[sl].t(), xs_AD[sl], out=dw_up[e])
            if gated and need_wg:
                torch.mm(dg_AH[sl].t(), xs_AD[sl], out=dw_gate[e])
            if need_x:
                torch.mm(du_AH[sl], w_up[e], out=dx_AD[sl])
                if gated:
                    dx_AD[sl].addmm_(dg_AH[sl], w_gate[e])
        dx_TD = torch.zeros_like(x_TD).index_add_(0, token_A, dx_AD) if need_x else None
        return dx_TD, None, gw, dw_gate, dw_up, dw_down, None, None


def grouped_ffn_combine(x_TD: Tensor, token_A: Tensor, weight_A: Tensor, w_gate: Tensor | None, w_up: Tensor,
                        w_down: Tensor, counts: list[int], activation: str) -> Tensor:
    """out_t = sum over sorted assignments a with token t of weight_a * expert_{e(a)}(x_t).

    x_TD: (T, D); token_A, weight_A: (A,) sorted so that expert e owns the run of ``counts[e]`` rows;
    w_gate, w_up: (E, H, D) (w_gate None without a gate); w_down: (E, D, H). Returns (T, D).
    """
    return _GroupedFFNCombine.apply(x_TD, token_A, weight_A, w_gate, w_up, w_down, counts, activation)
