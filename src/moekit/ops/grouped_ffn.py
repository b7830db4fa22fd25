"""Fused grouped expert FFN with combine: gather -> experts -> weighted scatter, as one autograd op.

Legend: T tokens, D model dim, E experts, H expert hidden, A assignments, S assignments kept and
sorted by expert (expert e owns a contiguous run of n_e rows).

:func:`grouped_ffn` takes the router's assignments as they come (token, expert, weight; expert id E
marks an assignment dropped by the capacity limit) and runs the kernels :func:`_sorted_forward` and
:func:`_sorted_backward` over them. Under ``torch.compile`` it is the ``torch.library`` custom op
``moekit::grouped_ffn``: every input and output has a static shape, and the sort, the per-expert
counts and their one host sync happen inside the op, so an MoE layer traces without graph breaks
(dropless and capacity mode alike). Eagerly the same kernels run under a plain autograd Function,
which skips the op dispatcher's per-call cost.

Why a custom autograd op (and not plain autograd over a loop):
- it saves only the sort order, the combine weights and the two (A, H) pre-activations; the
  gathered input (A, D) and the expert outputs (A, D) are re-gathered / never needed, so the
  activation memory is below that of a dense FFN of the same active width;
- the expert weight gradients are written into one preallocated (E, ...) tensor per weight, once,
  instead of autograd accumulating a full-size zero-padded gradient per expert (cost ~E^2);
- the gradient of each combine weight is <g_t, y_a> = <g_t @ w_down, h_a>, computed from the
  backward's own matmul, so the expert outputs need not be stored;
- per-expert work is only matmuls; every elementwise step runs once over all rows, so the number
  of kernel launches does not grow with E (each launch is a thread barrier on the CPU).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.ops.expert_threads import for_each_expert, use_expert_threads
from moekit.ops.gemv import linear, swiglu_expert

__all__ = ["grouped_ffn"]


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


def _expert_grad_buffer(w: Tensor, counts: list[int]) -> Tensor:
    """Uninitialised (E, ...) gradient; only experts that received no rows are zeroed (the others are
    overwritten by their matmul), so no pass over the whole weight-sized buffer is spent on zeros."""
    g = torch.empty_like(w)
    for e, n in enumerate(counts):
        if n == 0:
            g[e].zero_()
    return g


def _sorted_forward(x_TD: Tensor, tok_S: Tensor, w_S: Tensor, w_gate: Tensor | None, w_up: Tensor, w_down: Tensor,
                    counts: list[int], activation: str, rows: int | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """out_TD and the pre-activations (g, u) of the S sorted rows, in buffers of ``rows`` >= S rows
    (the tail beyond S is zero)."""
    gated = w_gate is not None
    S, H = tok_S.numel(), w_up.shape[1]
    rows = S if rows is None else rows
    # 1. gather every kept assignment's token once: (S, D), freed after forward
    xs_SD = x_TD.index_select(0, tok_S)
    u_RH = x_TD.new_empty(rows, H)
    g_RH = x_TD.new_empty(rows, H) if gated else None
    if rows > S:
        u_RH[S:].zero_()
        if gated:
            g_RH[S:].zero_()
    u_SH, g_SH = u_RH[:S], (g_RH[:S] if gated else None)
    par = use_expert_threads(counts, x_TD.device, x_TD.shape[1] * H)

    # 2. up (and gate) projections: one matmul per expert over its contiguous run
    def up_gate(e: int, sl: slice) -> None:
        torch.mm(xs_SD[sl], w_up[e].t(), out=u_SH[sl])
        if gated:
            torch.mm(xs_SD[sl], w_gate[e].t(), out=g_SH[sl])

    for_each_expert(counts, up_gate, x_TD.device, par)
    del xs_SD
    h_SH = F.silu(g_SH).mul_(u_SH) if gated else _act(activation, u_SH)
    # 3. down projection, then the combine weight and a scatter-add back to token order
    y_SD = x_TD.new_empty(S, x_TD.shape[1])
    for_each_expert(counts, lambda e, sl: torch.mm(h_SH[sl], w_down[e].t(), out=y_SD[sl]), x_TD.device, par)
    y_SD.mul_(w_S.to(y_SD.dtype).unsqueeze(1))
    out_TD = torch.zeros_like(x_TD).index_add_(0, tok_S, y_SD)
    return out_TD, g_RH, u_RH


def _sorted_backward(gout_TD: Tensor, x_TD: Tensor, tok_S: Tensor, w_S: Tensor, w_gate: Tensor | None, w_up: Tensor,
                     w_down: Tensor, g_SH: Tensor | None, u_SH: Tensor, counts: list[int], activation: str,
                     needs: tuple[bool, bool, bool, bool, bool]):
    """Gradients (dx_TD, dw_S, dw_gate, dw_up, dw_down) of the sorted forward; None where not needed.

    ``needs``: (x, combine weights, w_gate, w_up, w_down)."""
    gated = w_gate is not None
    need_x, need_w, need_wg, need_wu, need_wd = needs
    S, H = tok_S.numel(), w_up.shape[1]
    par = use_expert_threads(counts, x_TD.device, x_TD.shape[1] * H)
    w_S1 = w_S.to(x_TD.dtype).unsqueeze(1)
    gy_SD = gout_TD.index_select(0, tok_S)  # dL/dy_a before the combine weight
    # 1. recompute h from the saved pre-activations (cheap, elementwise, all rows at once)
    if gated:
        sg_SH = F.silu(g_SH)
        h_SH = sg_SH * u_SH
    else:
        h_SH = _act(activation, u_SH)
    # 2. dh = gy @ w_down per expert; w_down's gradient uses the weighted gy
    dh_SH = x_TD.new_empty(S, H)
    gyw_SD = gy_SD * w_S1
    dw_down = _expert_grad_buffer(w_down, counts) if need_wd else None

    def down_grads(e: int, sl: slice) -> None:
        torch.mm(gy_SD[sl], w_down[e], out=dh_SH[sl])
        if need_wd:
            torch.mm(gyw_SD[sl].t(), h_SH[sl], out=dw_down[e])

    for_each_expert(counts, down_grads, x_TD.device, par)
    del gy_SD, gyw_SD
    # 3. combine-weight gradient <g_t, y_a> = <g_t @ w_down, h_a>; then through the activation
    gw_S = torch.linalg.vecdot(dh_SH, h_SH).to(w_S.dtype) if need_w else None
    del h_SH
    dh_SH.mul_(w_S1)
    # aten's fused activation backward kernels: one pass each instead of a chain of elementwise ops
    if gated:
        du_SH = dh_SH * sg_SH
        del sg_SH
        dg_SH = torch.ops.aten.silu_backward(dh_SH.mul_(u_SH), g_SH)
    else:
        du_SH = _act_backward(activation, dh_SH, u_SH)
        dg_SH = None
    # 4. input-side weight gradients and dx, per expert
    xs_SD = x_TD.index_select(0, tok_S)
    dw_gate = _expert_grad_buffer(w_gate, counts) if (gated and need_wg) else None
    dw_up = _expert_grad_buffer(w_up, counts) if need_wu else None
    dx_SD = torch.empty_like(xs_SD) if need_x else None

    def input_grads(e: int, sl: slice) -> None:
        if need_wu:
            torch.mm(du_SH[sl].t(), xs_SD[sl], out=dw_up[e])
        if gated and need_wg:
            torch.mm(dg_SH[sl].t(), xs_SD[sl], out=dw_gate[e])
        if need_x:
            torch.mm(du_SH[sl], w_up[e], out=dx_SD[sl])
            if gated:
                dx_SD[sl].addmm_(dg_SH[sl], w_gate[e])

    for_each_expert(counts, input_grads, x_TD.device, par)
    dx_TD = torch.zeros_like(x_TD).index_add_(0, tok_S, dx_SD) if need_x else None
    return dx_TD, gw_S, dw_gate, dw_up, dw_down


# -- unsorted entry point: the compile-friendly custom op --------------------------------------------
def _host_counts(expert_A: Tensor, num_experts: int) -> list[int]:
    """Rows of each expert, on the host (the op's one sync); dropped assignments (id E) not counted."""
    return torch.bincount(expert_A, minlength=num_experts + 1)[:num_experts].tolist()


def _plan(expert_A: Tensor, num_experts: int) -> tuple[Tensor, list[int]]:
    """Kept assignments' indices sorted by expert (stable) and the per-expert counts on the host.
    Dropped assignments (expert id E) sort last and are left out."""
    return expert_A.argsort(stable=True), _host_counts(expert_A, num_experts)


def _grouped_ffn_impl(x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor, w_gate: Tensor | None,
                      w_up: Tensor, w_down: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out_TD, order_A, g_AH, u_AH): the pre-activations of the kept rows in expert order, zero tail."""
    order_A, counts = _plan(expert_A, w_up.shape[0])
    kept_S = order_A[:sum(counts)]
    out_TD, g_AH, u_AH = _sorted_forward(x_TD, token_A[kept_S], weight_A[kept_S], w_gate, w_up, w_down, counts,
                                         activation, rows=token_A.numel())
    return out_TD, order_A, (g_AH if g_AH is not None else x_TD.new_empty(0)), u_AH


def _grouped_ffn_backward_impl(gout_TD: Tensor, x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor,
                               w_gate: Tensor | None, w_up: Tensor, w_down: Tensor, order_A: Tensor, g_AH: Tensor,
                               u_AH: Tensor, activation: str, needs: list[bool]) -> tuple[Tensor | None, ...]:
    """(dx_TD, dweight_A, dw_gate, dw_up, dw_down), None where not needed."""
    counts = _host_counts(expert_A, w_up.shape[0])
    S = sum(counts)
    kept_S = order_A[:S]
    dx, gw_S, dwg, dwu, dwd = _sorted_backward(gout_TD, x_TD, token_A[kept_S], weight_A[kept_S], w_gate, w_up, w_down,
                                               g_AH[:S] if w_gate is not None else None, u_AH[:S], counts, activation,
                                               tuple(needs))
    if gw_S is not None:  # back to the caller's assignment order; dropped assignments get 0
        gw_S = torch.zeros_like(weight_A).index_copy_(0, kept_S, gw_S)
    return dx, gw_S, dwg, dwu, dwd


def _needs(needs_input_grad, w_gate) -> list[bool]:
    need_x, _, _, need_w, need_wg, need_wu, need_wd, _ = needs_input_grad
    return [bool(need_x), bool(need_w), bool(need_wg and w_gate is not None), bool(need_wu), bool(need_wd)]


class _GroupedFFN(torch.autograd.Function):
    """Eager twin of the custom op: the same kernels without the op dispatcher's per-call cost
    (which is paid every decode step); ``grouped_ffn`` uses the custom op only under torch.compile."""

    @staticmethod
    def forward(ctx, x_TD, token_A, expert_A, weight_A, w_gate, w_up, w_down, activation):
        out_TD, order_A, g_AH, u_AH = _grouped_ffn_impl(x_TD, token_A, expert_A, weight_A, w_gate, w_up, w_down,
                                                        activation)
        ctx.save_for_backward(x_TD, token_A, expert_A, weight_A, w_gate, w_up, w_down, order_A, g_AH, u_AH)
        ctx.activation = activation
        return out_TD

    @staticmethod
    def backward(ctx, gout_TD):
        x_TD, token_A, expert_A, weight_A, w_gate, w_up, w_down, order_A, g_AH, u_AH = ctx.saved_tensors
        needs = _needs(ctx.needs_input_grad, w_gate)
        dx, dw, dwg, dwu, dwd = _grouped_ffn_backward_impl(gout_TD.contiguous(), x_TD, token_A, expert_A, weight_A,
                                                           w_gate, w_up, w_down, order_A, g_AH, u_AH, ctx.activation,
                                                           needs)
        return dx, None, None, dw, dwg, dwu, dwd, None


@torch.library.custom_op("moekit::grouped_ffn", mutates_args=())
def _grouped_ffn_op(x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor, w_gate: Optional[Tensor],
                    w_up: Tensor, w_down: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _grouped_ffn_impl(x_TD, token_A, expert_A, weight_A, w_gate, w_up, w_down, activation)


@_grouped_ffn_op.register_fake
def _(x_TD, token_A, expert_A, weight_A, w_gate, w_up, w_down, activation):
    A, H = token_A.shape[0], w_up.shape[1]
    g = x_TD.new_empty(A, H) if w_gate is not None else x_TD.new_empty(0)
    return torch.empty_like(x_TD), torch.empty_like(expert_A), g, x_TD.new_empty(A, H)


@torch.library.custom_op("moekit::grouped_ffn_backward", mutates_args=())
def _grouped_ffn_backward_op(gout_TD: Tensor, x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor,
                             w_gate: Optional[Tensor], w_up: Tensor, w_down: Tensor, order_A: Tensor, g_AH: Tensor,
                             u_AH: Tensor, activation: str, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx_TD, dweight_A, dw_gate, dw_up, dw_down); a 0-size tensor stands for a gradient not needed."""
    grads = _grouped_ffn_backward_impl(gout_TD, x_TD, token_A, expert_A, weight_A, w_gate, w_up, w_down, order_A,
                                       g_AH, u_AH, activation, needs)
    return tuple(t if t is not None else x_TD.new_empty(0) for t in grads)


@_grouped_ffn_backward_op.register_fake
def _(gout_TD, x_TD, token_A, expert_A, weight_A, w_gate, w_up, w_down, order_A, g_AH, u_AH, activation, needs):
    like = (x_TD, weight_A, w_gate, w_up, w_down)
    return tuple(torch.empty_like(t) if (n and t is not None) else x_TD.new_empty(0) for t, n in zip(like, needs))


def _setup_context(ctx, inputs, output):
    x_TD, token_A, expert_A, weight_A, w_gate, w_up, w_down, activation = inputs
    _, order_A, g_AH, u_AH = output
    ctx.save_for_backward(x_TD, token_A, expert_A, weight_A, w_gate, w_up, w_down, order_A, g_AH, u_AH)
    ctx.activation = activation


def _backward(ctx, gout_TD, _d_order, _d_g, _d_u):
    x_TD, token_A, expert_A, weight_A, w_gate, w_up, w_down, order_A, g_AH, u_AH = ctx.saved_tensors
    needs = _needs(ctx.needs_input_grad, w_gate)
    grads = torch.ops.moekit.grouped_ffn_backward(gout_TD.contiguous(), x_TD, token_A, expert_A, weight_A, w_gate,
                                                  w_up, w_down, order_A, g_AH, u_AH, ctx.activation, needs)
    dx, dw, dwg, dwu, dwd = (g if n else None for g, n in zip(grads, needs))
    return dx, None, None, dw, dwg, dwu, dwd, None


_grouped_ffn_op.register_autograd(_backward, setup_context=_setup_context)


# up to this many assignments a call without autograd plans on the host (decode steps): the sort, the
# counts and the autograd Function cost more than the few GEMMs they organise
FEW_ASSIGNMENTS = 16
# inside a compiled graph (a decode step of up to 8 rows x top-8) the gathered reduction streams every
# assignment's expert at the reduction's speed, where the custom op runs MKL's GEMV expert by expert: a
# 4-row step of a 2-layer OLMoE-shaped model in bf16 took 50 ms instead of 94
TRACED_ASSIGNMENTS = 64


def _few_rows_forward(x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor, w_gate: Tensor | None,
                      w_up: Tensor, w_down: Tensor, activation: str) -> Tensor:
    """The sorted forward's arithmetic, planned in Python: one GEMM per expert over its rows, the same
    elementwise steps, each token's sum in expert order; only the bookkeeping ops are gone. With one token
    (batch-1 decode) the bits equal :func:`_sorted_forward`'s, except that experts of at least
    ``moekit.ops.gemv.MIN_BYTES`` per matrix take the streaming single-row kernel (equal to rounding); with
    several tokens they agree to rounding (the elementwise kernels see per-expert blocks instead of one
    buffer). Offloaded experts run this same path, so they match the resident model bit for bit."""
    E = w_up.shape[0]
    experts, tokens = expert_A.tolist(), token_A.tolist()
    runs: dict[int, list[int]] = {}
    for a, e in enumerate(experts):
        if e < E:
            runs.setdefault(e, []).append(a)
    out_TD = torch.zeros_like(x_TD)
    w_A1 = weight_A.unsqueeze(1) if weight_A.dtype == x_TD.dtype else weight_A.to(x_TD.dtype).unsqueeze(1)
    for e in sorted(runs):
        rows = runs[e]
        if len(rows) == 1:
            a, t = rows[0], tokens[rows[0]]
            xs, w, tok = x_TD[t:t + 1], w_A1[a:a + 1], None
        else:
            tok = torch.tensor([tokens[a] for a in rows], device=x_TD.device)
            xs, w = x_TD.index_select(0, tok), w_A1[torch.tensor(rows, device=x_TD.device)]
        if tok is None and w_gate is not None:  # one row of a large swiglu expert: one compiled call
            y = swiglu_expert(xs, w_gate[e], w_up[e], w_down[e], w)
            if y is not None:
                out_TD[t:t + 1].add_(y)
                continue
        # at one row of a large expert the streaming kernel, else mm(x, w.t()) as in the sorted forward
        u = linear(xs, w_up[e])
        h = F.silu(linear(xs, w_gate[e])).mul_(u) if w_gate is not None else _act(activation, u)
        y = linear(h, w_down[e]).mul_(w)
        if tok is None:
            out_TD[t:t + 1].add_(y)
        else:
            out_TD.index_add_(0, tok, y)
    return out_TD


def _gathered_forward(x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor, w_gate: Tensor | None,
                      w_up: Tensor, w_down: Tensor, activation: str) -> Tensor:
    """The traced form of a few rows without autograd (a compiled decode step): every assignment reads its
    expert's matrices by index inside a product-and-sum the compiler fuses into one reduction, so nothing is
    sorted, counted or synced on the host and the (A, H, D) gather is never materialised. Equal to
    :func:`_sorted_forward` to rounding (each sum runs in the reduction's order)."""
    E = w_up.shape[0]
    e_A = expert_A.clamp_max(E - 1)  # a dropped assignment (id E) reads expert E-1 and is weighted 0
    w_A = torch.where(expert_A < E, weight_A.float(), 0)
    # in fp32, as the single-row kernels: bf16 products summed in fp32, rounded once at the end
    x_A1D = x_TD.index_select(0, token_A).unsqueeze(1).float()
    u_AH = (w_up[e_A].float() * x_A1D).sum(-1)
    h_AH = (F.silu((w_gate[e_A].float() * x_A1D).sum(-1)) * u_AH if w_gate is not None
            else _act(activation, u_AH))
    y_AD = ((w_down[e_A].float() * h_AH.unsqueeze(1)).sum(-1) * w_A.unsqueeze(1)).to(x_TD.dtype)
    return torch.zeros_like(x_TD).index_add_(0, token_A, y_AD)


def _wants_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def grouped_ffn(x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor, w_gate: Tensor | None,
                w_up: Tensor, w_down: Tensor, activation: str) -> Tensor:
    """out_t = sum over assignments a with token t and expert_A[a] < E of weight_a * expert_{e(a)}(x_t).

    x_TD: (T, D); token_A, expert_A (int64) and weight_A: (A,) in any order, ``expert_A == E`` marking
    an assignment dropped by the capacity limit (it contributes 0 and gets a 0 gradient);
    w_gate, w_up: (E, H, D) (w_gate None without a gate); w_down: (E, D, H). Returns (T, D).
    Under ``torch.compile`` this is the custom op ``moekit::grouped_ffn`` (a few rows without autograd: a
    fused gathered reduction); eagerly, an autograd Function over the same kernels.
    """
    no_grad = not _wants_grad(x_TD, weight_A, w_gate, w_up, w_down)
    few = token_A.numel() <= FEW_ASSIGNMENTS and no_grad
    if torch.compiler.is_compiling():
        if token_A.numel() <= TRACED_ASSIGNMENTS and no_grad:
            return _gathered_forward(x_TD, token_A, expert_A, weight_A, w_gate, w_up, w_down, activation)
        return torch.ops.moekit.grouped_ffn(x_TD, token_A, expert_A, weight_A, w_gate, w_up, w_down, activation)[0]
    if few:
        return _few_rows_forward(x_TD, token_A, expert_A, weight_A, w_gate, w_up, w_down, activation)
    return _GroupedFFN.apply(x_TD, token_A, expert_A, weight_A, w_gate, w_up, w_down, activation)
