"""Routing maths as pure functions: scores -> (expert, token, weight) assignments.

Legend: T tokens, D model dim, E experts, K top-k, A assignments ((token, expert) pairs), C capacity.

Every router produces a :class:`Routing`. Token-choice routers fill ``indices_TK``/``weights_TK``
(rank order: column 0 is each token's first choice); expert choice and the dense mixture produce
their assignment lists directly. :func:`assignments` flattens both kinds to one format, and
:func:`apply_capacity` drops assignments beyond each expert's C slots.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Routing",
    "Assignments",
    "pick_topk",
    "topk_route",
    "noisy_topk_route",
    "sigmoid_bias_route",
    "expert_choice_route",
    "dense_route",
    "assignments",
    "capacity",
    "apply_capacity",
    "expert_counts",
]


@dataclass
class Routing:
    """Result of a router. ``probs_TE`` is what the balance loss uses as P (before drops)."""

    logits_TE: Tensor  # fp32 router logits
    probs_TE: Tensor  # softmax(l), or normalised sigmoid scores (sigmoid_bias)
    indices_TK: Tensor | None = None  # token-choice picks, rank order
    weights_TK: Tensor | None = None  # their combine weights
    token_A: Tensor | None = None  # expert choice / dense: assignment lists
    expert_A: Tensor | None = None
    weight_A: Tensor | None = None
    # dynamic-k routers (top_p, relu): which of the K columns are real picks (the rest carry weight 0)
    active_TK: Tensor | None = None
    # relu: the router's own weight on its regulariser (ReMoE's adaptive lambda, a 0-d fp32 tensor)
    aux_coef: Tensor | None = None
    # hierarchical: the outer (group) gate's probabilities and picks, for the group-level balance term
    group_probs_TG: Tensor | None = None
    group_indices_TG: Tensor | None = None


@dataclass
class Assignments:
    """Flat (token, expert, weight) pairs; ``rank_A`` is the router's choice order (0 = first)."""

    token_A: Tensor  # int64
    expert_A: Tensor  # int64
    weight_A: Tensor  # fp32, differentiable
    rank_A: Tensor  # int64

    def select(self, keep_A: Tensor) -> "Assignments":
        return Assignments(self.token_A[keep_A], self.expert_A[keep_A], self.weight_A[keep_A], self.rank_A[keep_A])


def pick_topk(scores_TE: Tensor, k: int, picks_TK: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(values, indices) of each row's k best scores in rank order; with ``picks_TK`` (routing replay)
    those experts instead, in their recorded order, and their current scores."""
    if picks_TK is None:
        return scores_TE.topk(k, dim=-1)
    return scores_TE.gather(1, picks_TK), picks_TK


def topk_route(logits_TE: Tensor, k: int, *, normalize: bool, picks_TK: Tensor | None = None,
               probs_TE: Tensor | None = None) -> Routing:
    """Softmax top-k (Mixtral, GShard; Switch is k=1, normalize=False).

    weights = the k largest p = softmax(l), renormalised to sum 1 when ``normalize``.
    ``picks_TK``: replay these choices (:func:`pick_topk`). ``probs_TE``: softmax(l) when the caller
    computed it with a faster kernel (``moekit.ops.softmax``).
    """
    if probs_TE is None:
        probs_TE = logits_TE.softmax(dim=-1)
    weights_TK, indices_TK = pick_topk(probs_TE, k, picks_TK)  # sorted: rank order
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return Routing(logits_TE, probs_TE, indices_TK, weights_TK)


def noisy_topk_route(logits_TE: Tensor, noise_std_TE: Tensor | None, k: int, generator=None,
                     picks_TK: Tensor | None = None) -> Routing:
    """Noisy top-k gating (Shazeer et al. 2017).

    l' = l + N(0, 1) * noise_std (noise_std = softplus(x @ w_noise.T), None in eval);
    top-k of l', weights = softmax over the k selected l'. P for the balance loss is softmax(l).
    """
    noisy_TE = logits_TE
    if noise_std_TE is not None:
        eps_TE = torch.randn(logits_TE.shape, generator=generator, device=logits_TE.device, dtype=logits_TE.dtype)
        noisy_TE = logits_TE + eps_TE * noise_std_TE
    top_TK, indices_TK = pick_topk(noisy_TE, k, picks_TK)
    return Routing(logits_TE, logits_TE.softmax(dim=-1), indices_TK, top_TK.softmax(dim=-1))


def sigmoid_bias_route(
    logits_TE: Tensor,
    bias_E: Tensor,
    k: int,
    *,
    normalize: bool = True,
    scaling: float = 1.0,
    n_group: int = 1,
    topk_group: int = 1,
    score_func: str = "sigmoid",
    group_score: str = "sum_top",
    group_top: int = 2,
    picks_TK: Tensor | None = None,
) -> Routing:
    """DeepSeek-V3 routing: s = sigmoid(l); pick top-k of s + bias; weights = chosen s normalised, * scaling.

    The bias only chooses (no gradient flows through it). With ``n_group > 1`` only experts in the
    ``topk_group`` groups with the best group scores are eligible: the sum of the group's ``group_top``
    best biased scores (``group_score="sum_top"``, DeepSeek-V3 with ``group_top`` = K/M) or its best
    one (``"max"``, DeepSeek-V2's ``group_limited_greedy``).
    ``score_func="softmax"`` is ERNIE 4.5: s = softmax(l), and the chosen s are divided by
    ``max(sum, 1e-12)`` (its ``moe_norm_min``) rather than ``sum + 1e-20``.
    """
    if score_func not in ("sigmoid", "softmax"):
        raise ValueError(f"score_func={score_func!r} is unknown; choose 'sigmoid' or 'softmax'")
    scores_TE = logits_TE.sigmoid() if score_func == "sigmoid" else logits_TE.softmax(dim=-1)
    choice_TE = scores_TE.detach() + bias_E.to(scores_TE.dtype)
    if n_group > 1:
        T, E = choice_TE.shape
        grouped_TGe = choice_TE.view(T, n_group, E // n_group)
        if group_score == "max":
            group_score_TG = grouped_TGe.amax(dim=-1)
        elif group_score == "sum_top":
            group_score_TG = grouped_TGe.topk(min(group_top, E // n_group), dim=-1).values.sum(-1)
        else:
            raise ValueError(f"group_score={group_score!r} is unknown; choose 'sum_top' or 'max'")
        best_groups = group_score_TG.topk(topk_group, dim=-1).indices
        group_mask_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, best_groups, True)
        expert_mask_TE = group_mask_TG.repeat_interleave(E // n_group, dim=1)
        choice_TE = choice_TE.masked_fill(~expert_mask_TE, float("-inf"))
    # rank order = order of s + bias
    indices_TK = pick_topk(choice_TE, k, picks_TK)[1]
    weights_TK = scores_TE.gather(1, indices_TK)
    if normalize and score_func == "softmax":
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    elif normalize:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    weights_TK = weights_TK * scaling
    probs_TE = scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)
    return Routing(logits_TE, probs_TE, indices_TK, weights_TK)


def capacity(num_tokens: int | Tensor, num_experts: int, k: int, capacity_factor: float) -> int | Tensor:
    """C = min(n, ceil(capacity_factor * n * k / E)) slots per expert.

    ``num_tokens`` may be a 0-d tensor (a count of real tokens under a padding mask); then so is C,
    computed in float64 with the same operations as the int case."""
    if isinstance(num_tokens, Tensor):
        c = torch.ceil(num_tokens.to(torch.float64) * capacity_factor * k / num_experts).to(num_tokens.dtype)
        return torch.minimum(num_tokens, c)
    return min(num_tokens, math.ceil(capacity_factor * num_tokens * k / num_experts))


def expert_choice_route(logits_TE: Tensor, k: int, capacity_factor: float | None) -> Routing:
    """Expert choice (Zhou et al. 2022): each expert takes its C highest-s tokens, s = softmax(l).

    C = min(n, ceil(capacity_factor * n * k / E)), capacity_factor defaulting to 1. A token may be
    taken by several experts or by none.
    """
    T, E = logits_TE.shape
    probs_TE = logits_TE.softmax(dim=-1)
    C = capacity(T, E, k, 1.0 if capacity_factor is None else capacity_factor)
    weight_EC, token_EC = probs_TE.t().topk(C, dim=-1)
    expert_EC = torch.arange(E, device=logits_TE.device).unsqueeze(1).expand(E, C)
    return Routing(logits_TE, probs_TE, token_A=token_EC.reshape(-1), expert_A=expert_EC.reshape(-1),
                   weight_A=weight_EC.reshape(-1))


def dense_route(logits_TE: Tensor) -> Routing:
    """Soft mixture of experts (Jacobs et al. 1991): every expert computes, weights = p."""
    T, E = logits_TE.shape
    probs_TE = logits_TE.softmax(dim=-1)
    dev = logits_TE.device
    token_A = torch.arange(T, device=dev).repeat_interleave(E)
    expert_A = torch.arange(E, device=dev).repeat(T)
    return Routing(logits_TE, probs_TE, token_A=token_A, expert_A=expert_A, weight_A=probs_TE.reshape(-1))


def assignments(routing: Routing) -> Assignments:
    """Flatten a routing to (token, expert, weight, rank) lists; token-major for token choice."""
    if routing.indices_TK is not None:
        T, K = routing.indices_TK.shape
        dev = routing.indices_TK.device
        token_A = torch.arange(T, device=dev).unsqueeze(1).expand(T, K).reshape(-1)
        rank_A = torch.arange(K, device=dev).expand(T, K).reshape(-1)
        return Assignments(token_A, routing.indices_TK.reshape(-1), routing.weights_TK.reshape(-1), rank_A)
    assert routing.token_A is not None, "routing has neither top-k picks nor an assignment list"
    return Assignments(routing.token_A, routing.expert_A, routing.weight_A, torch.zeros_like(routing.token_A))


def expert_counts(expert_A: Tensor, num_experts: int) -> Tensor:
    """(E,) int64: how many entries of ``expert_A`` name each expert; ids >= E (the "dropped" marker E)
    are not counted. Unlike ``bincount`` the output shape never depends on the data, so
    ``torch.compile`` traces it without a graph break."""
    idx = expert_A.reshape(-1).clamp_max(num_experts)
    ones = torch.ones_like(idx)
    return torch.zeros(num_experts + 1, dtype=torch.long, device=idx.device).scatter_add_(0, idx, ones)[:num_experts]


def apply_capacity(a: Assignments, num_experts: int, num_tokens: int, cap: int | Tensor, policy: str,
                   valid_A: Tensor | None = None) -> Tensor:
    """Boolean keep mask (A,) leaving each expert at most ``cap`` assignments.

    ``position`` (GShard): an expert keeps the earliest tokens, all first choices before any
    second choice. ``probs``: an expert keeps its ``cap`` highest-weight assignments.
    ``valid_A`` (padding mask per assignment): invalid assignments take no slot and are not kept.
    """
    if policy == "position":
        priority_A = (a.rank_A * num_tokens + a.token_A).to(torch.float64)
    elif policy == "probs":
        priority_A = -a.weight_A.detach().to(torch.float64)
    else:
        raise ValueError(f"drop_policy={policy!r} is unknown; choose 'probs' or 'position'")
    if valid_A is not None:  # padding sorts after every real assignment of its expert
        priority_A = priority_A.masked_fill(~valid_A, float("inf"))
    # 1. order by priority, then (stably) by expert: each expert's assignments become a
    #    contiguous run sorted by priority
    order = priority_A.argsort(stable=True)
    order = order[a.expert_A[order].argsort(stable=True)]
    # 2. position of every assignment inside its expert's run
    counts_E = expert_counts(a.expert_A, num_experts)
    starts_E = counts_E.cumsum(0) - counts_E
    pos_sorted = torch.arange(order.numel(), device=order.device) - starts_E[a.expert_A[order]]
    keep_A = torch.empty_like(a.expert_A, dtype=torch.bool)
    keep_A[order] = pos_sorted < cap
    return keep_A if valid_A is None else keep_A & valid_A
