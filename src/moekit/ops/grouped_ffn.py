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


def _act_grad(name: str, z: Tensor) -> Tensor:
    """d act(z) / dz, elementwise."""
    if name == "swiglu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(z * 0.7071067811865476))
        pdf = torch.exp(-0.5 * z * z) * 0.3989422804014327
        return cdf + z * pdf
    return (z > 0).to(z.dtype)


class _GroupedFFNCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, token_A, weight_A, w_gate, w_up, w_down, counts, activation):
        gated = w_gate is not None
        A = token_A.numel()
        H = w_up.shape[1]
        # 1. gather every assignment's token once: (A, D), freed after forward
        xs_AD = x_TD.index_select(0, token_A)
        g_AH = torch.empty(A, H, dtype=x_TD.dtype, device=x_TD.device) if gated else None
        u_AH = torch.empty(A, H, dtype=x_TD.dtype, device=x_TD.device)
        y_AD = torch.empty_like(xs_AD)
        # 2. one matmul per expert over its contiguous run; unchosen experts do nothing
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sl = slice(start, start + n)
            torch.mm(xs_AD[sl], w_up[e].t(), out=u_AH[sl])
            if gated:
                torch.mm(xs_AD[sl], w_gate[e].t(), out=g_AH[sl])
                h = F.silu(g_AH[sl]) * u_AH[sl]
            else:
                h = _act(activation, u_AH[sl])
            torch.mm(h, w_down[e].t(), out=y_AD[sl])
            start += n
        # 3. weighted scatter-add back to token order
        y_AD.mul_(weight_A.to(y_AD.dtype).unsqueeze(1))
        out_TD = torch.zeros_like(x_TD).index_add_(0, token_A, y_AD)
        ctx.save_for_backward(x_TD, token_A, weight_A, w_gate, w_up, w_down, g_AH, u_AH)
        ctx.counts = counts
        ctx.activation = activation
        return out_TD

    @staticmethod
    def backward(ctx, gout_TD):
        x_TD, token_A, weight_A, w_gate, w_up, w_down, g_AH, u_AH = ctx.saved_tensors
        counts, activation = ctx.counts, ctx.activation
        gated = w_gate is not None
        need_x, _, need_w, need_wg, need_wu, need_wd = ctx.needs_input_grad[:6]
        xs_AD = x_TD.index_select(0, token_A)
        gy_AD = gout_TD.index_select(0, token_A)  # dL/dy before the combine weight
        wA1 = weight_A.to(x_TD.dtype).unsqueeze(1)
        dx_AD = torch.empty_like(xs_AD) if need_x else None
        gw_A = torch.empty(token_A.numel(), dtype=x_TD.dtype, device=x_TD.device) if need_w else None
        dw_gate = torch.zeros_like(w_gate) if (gated and need_wg) else None
        dw_up = torch.zeros_like(w_up) if need_wu else None
        dw_down = torch.zeros_like(w_down) if need_wd else None
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sl = slice(start, start + n)
            start += n
            xs, gy, u = xs_AD[sl], gy_AD[sl], u_AH[sl]
            if gated:
                g = g_AH[sl]
                sg = F.silu(g)
                h = sg * u
            else:
                h = _act(activation, u)
            dh = gy @ w_down[e]  # (n, H): g_t @ w_down, before the combine weight
            if need_w:
                gw_A[sl] = (dh * h).sum(dim=1)
            if need_wd:
                torch.mm((gy * wA1[sl]).t(), h, out=dw_down[e])
            dh.mul_(wA1[sl])
            if gated:
                du = dh * sg
                dg = dh * u * _act_grad("swiglu", g)
                if need_wg:
                    torch.mm(dg.t(), xs, out=dw_gate[e])
                if need_wu:
                    torch.mm(du.t(), xs, out=dw_up[e])
                if need_x:
                    dx = dg @ w_gate[e]
                    dx.addmm_(du, w_up[e])
                    dx_AD[sl] = dx
            else:
                du = dh * _act_grad(activation, u)
                if need_wu:
                    torch.mm(du.t(), xs, out=dw_up[e])
                if need_x:
                    torch.mm(du, w_up[e], out=dx_AD[sl])
        dx_TD = torch.zeros_like(x_TD).index_add_(0, token_A, dx_AD) if need_x else None
        gw = gw_A.to(weight_A.dtype) if need_w else None
        return dx_TD, None, gw, dw_gate, dw_up, dw_down, None, None


def grouped_ffn_combine(x_TD: Tensor, token_A: Tensor, weight_A: Tensor, w_gate: Tensor | None, w_up: Tensor,
                        w_down: Tensor, counts: list[int], activation: str) -> Tensor:
    """out_t = sum over sorted assignments a with token t of weight_a * expert_{e(a)}(x_t).

    x_TD: (T, D); token_A, weight_A: (A,) sorted so that expert e owns the run of ``counts[e]`` rows;
    w_gate, w_up: (E, H, D) (w_gate None without a gate); w_down: (E, D, H). Returns (T, D).
    """
    return _GroupedFFNCombine.apply(x_TD, token_A, weight_A, w_gate, w_up, w_down, counts, activation)
