"""SparseMixer-v2 routing (PhiMoE), its inference path: two picks, each weighted by a masked softmax.

Legend: T tokens, E experts.

Pick 1 is the top logit m1; its weight is its softmax probability among the experts whose logit is within
a relative ``2 eps`` of it: (m1 - l_e) / max(|l_e|, m1) <= 2 eps. Pick 2 is the top logit m2 once pick 1
is removed, weighted alike among the remaining experts within 2 eps of m2. PhiMoE trains with Gumbel
sampling of the picks and a Heun's-method gradient estimate; here the picks are always the top logits and
the gradient is plain autograd through the two softmaxes, so training differs from Phi's.
"""
from __future__ import annotations

import torch
from torch import Tensor

from moekit.functional.routing import Routing

__all__ = ["sparsemixer_route"]


def _masked_pick(scores_TE: Tensor, logits_TE: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(weight (T, 1), index (T, 1)) of the top of ``scores_TE`` (logits with earlier picks at -inf)."""
    with torch.no_grad():
        top_T1, index_T1 = scores_TE.max(dim=-1, keepdim=True)
        far_TE = (top_T1 - logits_TE) / logits_TE.abs().clamp(min=top_T1) > 2 * eps
    gates_TE = scores_TE.masked_fill(far_TE, float("-inf")).softmax(dim=-1)
    return gates_TE.gather(-1, index_T1), index_T1


def sparsemixer_route(logits_TE: Tensor, eps: float) -> Routing:
    """Two picks per token in rank order, with their masked-softmax weights (not renormalised)."""
    w1_T1, i1_T1 = _masked_pick(logits_TE, logits_TE, eps)
    w2_T1, i2_T1 = _masked_pick(logits_TE.scatter(-1, i1_T1, float("-inf")), logits_TE, eps)
    return Routing(logits_TE, logits_TE.softmax(dim=-1), torch.cat([i1_T1, i2_T1], dim=-1),
                   torch.cat([w1_T1, w2_T1], dim=-1))
