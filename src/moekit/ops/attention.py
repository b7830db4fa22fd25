"""Attention for a few queries inside a compiled decode graph, as reductions the compiler fuses.

Legend: B batch, H query heads, Hk key/value heads, G = H / Hk, S queries, L keys, d head dim.

Eagerly (and in training), ``scaled_dot_product_attention`` is the right call. Inside a compiled decode
step it is an opaque kernel with a fixed cost: the CPU flash kernel took ~100 us a call for 4 rows of one
query over ~100 keys of the default LM (4 heads of 32), a third of the whole step. Written as a product and
a sum over d, a softmax over L and a product and a sum over L, the same attention becomes a few reductions
that the compiler fuses with the projections around them: a compiled 4-row step of the default LM went from
1.19 to 0.96 ms, a 1-row step from 0.49 to 0.44 ms (medians).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TRACED_MAX_QUERIES", "traced_attention", "traces_attention"]

# decode steps and prefill chunks; a long prompt's (S, L) scores would be materialised
TRACED_MAX_QUERIES = 16


def traces_attention(q: Tensor, k: Tensor, mask: Tensor | None) -> bool:
    """Whether :func:`traced_attention` takes this call: inside a graph being compiled, without autograd, a
    boolean mask given and at most TRACED_MAX_QUERIES queries."""
    return (torch.compiler.is_compiling() and mask is not None and mask.dtype == torch.bool
            and q.shape[2] <= TRACED_MAX_QUERIES
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)))


def traced_attention(q_BHSd: Tensor, k_BKLd: Tensor, v_BKLd: Tensor, mask: Tensor, scale: float | None = None,
                     sinks_H: Tensor | None = None) -> Tensor:
    """softmax(q k^T * scale) v over the keys ``mask`` admits (boolean, broadcastable to (B, H, S, L); every
    query must admit at least one key), with a sink logit per head when ``sinks_H`` is given (it takes
    probability mass and adds no value); in fp32, cast back: (B, H, S, d of v)."""
    B, H, S, d = q_BHSd.shape
    Hk, L = k_BKLd.shape[1], k_BKLd.shape[2]
    G = H // Hk
    q = q_BHSd.float().reshape(B, Hk, G, S, 1, d)
    k = k_BKLd.float().reshape(k_BKLd.shape[0], Hk, 1, 1, L, d)
    v = v_BKLd.float().reshape(v_BKLd.shape[0], Hk, 1, 1, L, v_BKLd.shape[-1])  # its own head dim (MLA)
    scores = (q * k).sum(-1) * (d**-0.5 if scale is None else scale)  # (B, Hk, G, S, L)
    m = mask.view(*(1,) * (4 - mask.dim()), *mask.shape)  # (B or 1, H or 1, S or 1, L)
    m = m.reshape(m.shape[0], *((1, 1) if m.shape[1] == 1 else (Hk, G)), m.shape[2], L)
    scores = scores.masked_fill(~m, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    if sinks_H is not None:
        top = torch.maximum(top, sinks_H.float().view(1, Hk, G, 1, 1))
    p = (scores - top).exp()
    total = p.sum(-1, keepdim=True)
    if sinks_H is not None:
        total = total + (sinks_H.float().view(1, Hk, G, 1, 1) - top).exp()
    o = (p.unsqueeze(-1) * v).sum(-2) / total  # (B, Hk, G, S, d)
    return o.reshape(B, H, S, -1).to(q_BHSd.dtype)
