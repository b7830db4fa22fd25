"""Routers whose experts per token vary (top-p, ReLU) or come from two gates (hierarchical), and
their balancing terms, as pure functions.

Legend: T tokens, D model dim, E experts, K assignment columns per token, G expert groups,
g chosen groups per token, e experts per group.

Dynamic-k routers keep static shapes: every token has K columns (K = max_k for top-p, E for ReLU)
and ``active_TK`` says which are real picks; the rest carry weight 0 and the layer marks them like
capacity drops (expert id E), so they cost nothing and ``torch.compile`` sees no data-dependent shape.
"""
from __future__ import annotations

import torch
from torch import Tensor

from moekit.functional.losses import load_balancing_loss
from moekit.functional.routing import Routing, expert_counts

__all__ = [
    "top_p_route",
    "relu_route",
    "hierarchical_route",
    "dynamic_balancing_loss",
    "relu_l1_loss",
    "relu_l1_update",
    "hierarchical_balancing_loss",
]


def top_p_route(logits_TE: Tensor, top_p: float, *, rule: str = "ge", max_k: int | None = None) -> Routing:
    """Top-p routing (Huang et al. 2024): P = softmax(l), experts in descending P; expert j of that order
    is kept while the mass before it is < top_p (``rule="ge"``: the shortest prefix reaching top_p) or
    <= top_p (``"gt"``: the prefix must exceed it, the authors' code); at most ``max_k``.
    Weights = the raw P of the kept experts (not renormalised)."""
    if rule not in ("ge", "gt"):
        raise ValueError(f"top_p_rule={rule!r} is unknown; choose 'ge' or 'gt'")
    probs_TE = logits_TE.softmax(dim=-1)
    K = max_k or logits_TE.shape[-1]
    sorted_TE, order_TE = probs_TE.sort(dim=-1, descending=True)
    sorted_TK, indices_TK = sorted_TE[:, :K], order_TE[:, :K]
    before_TK = sorted_TK.cumsum(dim=-1) - sorted_TK  # mass of the experts ranked above
    active_TK = before_TK < top_p if rule == "ge" else before_TK <= top_p
    active_TK[:, 0] = True  # the best expert always runs (also when rounding makes `before` > 0)
    weights_TK = torch.where(active_TK, sorted_TK, 0)
    return Routing(logits_TE, probs_TE, indices_TK, weights_TK, active_TK=active_TK)


def relu_route(logits_TE: Tensor, l1_coef: Tensor | None = None) -> Routing:
    """ReLU routing (ReMoE): R = relu(l); expert e runs for token t iff R_te > 0, with weight R_te (no
    softmax, no top-k, no renormalisation); a token with no active expert gets no routed output.
    Columns are sorted by R (the rank order a capacity limit's "position" policy uses).
    ``probs_TE`` (for the entropy statistic) is R normalised per token, 0 for an inactive token."""
    R_TE = logits_TE.relu()
    R_TK, indices_TK = R_TE.sort(dim=-1, descending=True)  # rank order: the strongest activation first
    probs_TE = R_TE.detach() / R_TE.detach().sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return Routing(logits_TE, probs_TE, indices_TK, R_TK, active_TK=R_TK > 0, aux_coef=l1_coef)


def hierarchical_route(outer_TG: Tensor, inner_TE: Tensor, group_k: int, k: int) -> Routing:
    """Hierarchical MoE (Shazeer et al. 2017, appendix B): an outer gate picks the top-``group_k`` of G
    groups, an inner gate per group picks the top-``k`` of its e = E/G experts; each softmax is
    renormalised over its picks and the combine weight is outer x inner. Columns are group-major (the
    best group's experts first). ``probs_TE`` = P_outer(group of e) * P_inner(e | group)."""
    T, G = outer_TG.shape
    E = inner_TE.shape[1]
    e = E // G
    P_out_TG = outer_TG.softmax(dim=-1)
    w_out_Tg, groups_Tg = P_out_TG.topk(group_k, dim=-1)
    w_out_Tg = w_out_Tg / w_out_Tg.sum(dim=-1, keepdim=True)
    P_in_TGe = inner_TE.view(T, G, e).softmax(dim=-1)
    chosen_Tge = P_in_TGe.gather(1, groups_Tg.unsqueeze(-1).expand(T, group_k, e))
    w_in_Tgk, local_Tgk = chosen_Tge.topk(k, dim=-1)
    w_in_Tgk = w_in_Tgk / w_in_Tgk.sum(dim=-1, keepdim=True)
    indices_TK = (groups_Tg.unsqueeze(-1) * e + local_Tgk).reshape(T, group_k * k)
    weights_TK = (w_out_Tg.unsqueeze(-1) * w_in_Tgk).reshape(T, group_k * k)
    probs_TE = (P_out_TG.unsqueeze(-1) * P_in_TGe).reshape(T, E)
    return Routing(inner_TE, probs_TE, indices_TK, weights_TK, group_probs_TG=P_out_TG, group_indices_TG=groups_Tg)


def _real(mask_T: Tensor | None, like: Tensor) -> Tensor:
    return torch.ones(like.shape[0], dtype=torch.bool, device=like.device) if mask_T is None else mask_T


def dynamic_balancing_loss(probs_TE: Tensor, indices_TK: Tensor, active_TK: Tensor, num_experts: int,
                           mask_T: Tensor | None = None) -> Tensor:
    """E * sum_e f_e P_e with f_e = the share of the *active* assignments that go to e (a token counts as
    many times as it has experts) and P_e = mean over real tokens of p_e. 1 when uniform."""
    real_T = _real(mask_T, probs_TE)
    active_TK = active_TK & real_T.unsqueeze(1)
    counts_E = expert_counts(indices_TK.masked_fill(~active_TK, num_experts), num_experts).to(probs_TE.dtype)
    f_E = counts_E / active_TK.sum().clamp_min(1).to(probs_TE.dtype)
    P_E = torch.where(real_T.unsqueeze(1), probs_TE, 0).sum(0) / real_T.sum().clamp_min(1).to(probs_TE.dtype)
    return num_experts * (f_E * P_E).sum()


def relu_l1_loss(R_TE: Tensor, k: int, mask_T: Tensor | None = None) -> Tensor:
    """ReMoE's regulariser divided by lambda: sum_e f_e * mean_t R_te with f_e = E c_e / (k T), c_e the
    real tokens active on e, T the real tokens (f carries no gradient; R does)."""
    E = R_TE.shape[1]
    real_T1 = _real(mask_T, R_TE).unsqueeze(1)
    n = real_T1.sum().clamp_min(1).to(R_TE.dtype)
    c_E = ((R_TE.detach() > 0) & real_T1).sum(0).to(R_TE.dtype)
    f_E = E * c_E / (k * n)
    return (f_E * torch.where(real_T1, R_TE, 0).sum(0) / n).sum()


def relu_l1_update(l1: Tensor, sparsity: float, target: float, multiplier: float) -> Tensor:
    """ReMoE's adaptive lambda: times ``multiplier`` while the measured sparsity (fraction of inactive
    token-expert pairs) is below ``target`` (too many experts run), else divided by it."""
    return l1 * multiplier if sparsity < target else l1 / multiplier


def hierarchical_balancing_loss(routing: Routing, num_experts: int, mask_T: Tensor | None = None) -> Tensor:
    """Balance at both levels, summed: the Switch term of the outer gate over G groups, plus the mean over
    groups that got tokens of each group's Switch term over its e experts, counted on the tokens the
    group received (P from the inner softmax, f from the inner picks)."""
    P_TG, groups_Tg = routing.group_probs_TG, routing.group_indices_TG
    T, G = P_TG.shape
    e = num_experts // G
    outer = load_balancing_loss(P_TG, groups_Tg, G, mask_T)
    real_T = _real(mask_T, P_TG)
    in_TG = torch.zeros(T, G, dtype=torch.bool, device=P_TG.device).scatter_(1, groups_Tg, True) & real_T[:, None]
    n_G = in_TG.sum(0).to(P_TG.dtype)
    k = routing.indices_TK.shape[1] // groups_Tg.shape[1]
    idx_TK = routing.indices_TK.masked_fill(~real_T.unsqueeze(1), num_experts)
    counts_Ge = expert_counts(idx_TK, num_experts).to(P_TG.dtype).view(G, e)
    P_in_TGe = routing.probs_TE.view(T, G, e) / P_TG.unsqueeze(-1).clamp_min(1e-30)
    Psum_Ge = torch.where(in_TG.unsqueeze(-1), P_in_TGe, 0).sum(0)
    denom_G1 = n_G.clamp_min(1).unsqueeze(1)
    inner_G = e * ((counts_Ge / (denom_G1 * k)) * (Psum_Ge / denom_G1)).sum(1)
    present_G = n_G > 0
    return outer + (inner_G * present_G).sum() / present_G.sum().clamp_min(1)
