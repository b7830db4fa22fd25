"""The balancing terms and routing statistics of one MoE call, as one pure function.

Legend: T tokens (rows routed, padding included when masked), E experts, K top-k, A assignments.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from moekit.functional.losses_global import global_balancing_loss
from moekit.config import MoEConfig
from moekit.functional import losses as L
from moekit.functional import routing_dynamic as D
from moekit.functional.routing import Routing
from moekit.functional.stats_options import option_terms

__all__ = ["BALANCED_ROUTERS", "MoEStats", "RoutedCall", "losses_and_stats"]

# routers whose loads are balanced by construction (sinkhorn, base, soft) or fixed (hash): no balance term
BALANCED_ROUTERS = ("sinkhorn", "base", "hash", "soft")


@dataclass
class MoEStats:
    """Routing statistics of one call, detached; padding tokens are not counted anywhere."""

    tokens_per_expert: Tensor  # (E,) assignments computed by each expert (after drops)
    dropped: Tensor  # () assignments dropped by the capacity limit
    num_assignments: Tensor  # () assignments before drops
    num_tokens: int  # routed (non-padding) tokens (a 0-d tensor inside a torch.compile'd graph with a mask)
    balance_loss: Tensor
    z_loss: Tensor
    importance_loss: Tensor
    router_entropy: Tensor  # mean over tokens of the entropy of p (nats)
    # options on the routers (moekit.functional.stats_options); None / () when not configured
    device_loss: Tensor | None = None  # DeepSeek-V2 device-level balance term (num_devices > 1)
    comm_loss: Tensor | None = None  # DeepSeek-V2 communication balance term (num_devices > 1)
    bias_target: Tensor | None = None  # (E,) the bias quantile balancing asks for after this call
    extra_tokens_per_expert: Tensor | None = None  # (X,) assignments to each null / zero-computation expert
    extra_kinds: tuple[str, ...] = ()  # the kind of each of those X experts

    @property
    def drop_rate(self) -> Tensor:
        return self.dropped / self.num_assignments.clamp_min(1)

    @property
    def experts_per_token(self) -> Tensor:
        """Mean routed assignments per real token, before drops (top_k for a plain token-choice router;
        varies with top_p and relu)."""
        return self.num_assignments / max(self.num_tokens, 1) if isinstance(self.num_tokens, int) else \
            self.num_assignments / self.num_tokens.clamp_min(1)

    def to_dict(self) -> dict:
        """Plain Python numbers for logging (syncs: call outside the hot path)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None or (isinstance(v, tuple) and not v):  # an option that is not configured
                continue
            out[f.name] = v.tolist() if isinstance(v, Tensor) else v
        out["drop_rate"] = float(self.drop_rate)
        out["experts_per_token"] = float(self.experts_per_token)
        if self.extra_kinds:
            kinds: dict[str, int] = {}
            for kind, n in zip(self.extra_kinds, out["extra_tokens_per_expert"]):
                kinds[kind] = kinds.get(kind, 0) + int(n)
            out["tokens_per_kind"] = kinds
        return out


@dataclass
class RoutedCall:
    """What one forward routed: everything the balancing terms and the statistics are computed from.

    ``mask_T`` / ``valid_A``: the real rows / assignments (in :func:`assignments` order) when padding
    was kept in place (static shapes); None when every row is real. ``seq_ids_T``: the sequence of
    each row for the sequence-level balance term (None = batch-level).
    """

    routing: Routing
    counts_E: Tensor  # assignments computed per expert, after drops
    dropped: Tensor  # ()
    num_assignments: int | Tensor
    num_tokens: int | Tensor  # real tokens
    seq_ids_T: Tensor | None = None
    num_seqs: int = 1
    mask_T: Tensor | None = None
    valid_A: Tensor | None = None
    k_target: int = 1  # experts per token a relu router aims at (its top_k)
    expert_bias: Tensor | None = None  # the routing bias used (quantile balancing reads it)
    extra_counts: Tensor | None = None  # (X,) assignments to the null / zero-computation experts
    global_counts_E: Tensor | None = None  # balance_scope="global": the whole step's picks per expert


def _balance(call: RoutedCall, E: int) -> Tensor:
    r = call.routing
    E = r.probs_TE.shape[-1]  # null / zero-computation experts are balanced with the routed ones
    if r.group_probs_TG is not None:  # hierarchical: both levels
        return D.hierarchical_balancing_loss(r, E, call.mask_T)
    if r.aux_coef is not None:  # relu: ReMoE's regulariser / lambda
        return D.relu_l1_loss(r.logits_TE.relu(), call.k_target, call.mask_T)
    if r.active_TK is not None:
        return D.dynamic_balancing_loss(r.probs_TE, r.indices_TK, r.active_TK, E, call.mask_T)
    if call.global_counts_E is not None:  # f from the whole optimizer step, P from this forward
        return global_balancing_loss(r.probs_TE, call.global_counts_E, E, call.mask_T)
    if call.seq_ids_T is not None:
        return L.sequence_balancing_loss(r.probs_TE, r.indices_TK, call.seq_ids_T, call.num_seqs, E, call.mask_T)
    return L.load_balancing_loss(r.probs_TE, r.indices_TK, E, call.mask_T)


def _importance(call: RoutedCall, E: int) -> Tensor:
    """Squared CV of the per-expert gate sums, straight from the assignments (no (T, E) gate matrix)."""
    r = call.routing
    if r.indices_TK is not None:
        expert_A, weight_A = r.indices_TK.reshape(-1), r.weights_TK.reshape(-1)
    else:
        expert_A, weight_A = r.expert_A, r.weight_A
    weight_A = weight_A.to(r.probs_TE.dtype)
    if call.valid_A is not None:
        weight_A = torch.where(call.valid_A, weight_A, 0)
    # null / zero-computation experts (ids >= E) have their own bins, left out of the routed experts' CV
    return L.cv_squared(r.probs_TE.new_zeros(r.probs_TE.shape[-1]).index_add(0, expert_A, weight_A)[:E])


def _entropy(call: RoutedCall, any_tokens: bool, differentiable: bool = False) -> Tensor:
    """Mean router entropy over the real tokens (for sigmoid_bias: of the normalised scores).
    ``differentiable``: -sum p log_softmax(l), whose gradient stays finite where p underflows to 0."""
    r = call.routing
    if differentiable:
        entropy_T = -(r.probs_TE * r.logits_TE.log_softmax(dim=-1)).sum(-1)
    else:
        entropy_T = torch.special.entr(r.probs_TE).sum(-1)
    if call.mask_T is not None:
        return torch.where(call.mask_T, entropy_T, 0).sum() / call.mask_T.sum().clamp_min(1)
    return entropy_T.mean() if any_tokens else entropy_T.new_zeros(())


def losses_and_stats(call: RoutedCall, cfg: MoEConfig) -> tuple[Tensor, MoEStats]:
    """``aux = aux_loss_coef * balance + z_loss_coef * z + importance_loss_coef * importance`` over the
    real tokens, and the call's :class:`MoEStats`. Expert choice and the dense mixture are balanced by
    construction: their balance term is 0. A term whose coefficient is 0 is left out of ``aux``."""
    E = cfg.num_experts
    r = call.routing
    zero = r.logits_TE.new_zeros(())
    # a masked count is a tensor whose terms handle n = 0 themselves
    any_tokens = call.mask_T is not None or call.num_tokens > 0
    balanced = cfg.router in BALANCED_ROUTERS  # balanced by construction or fixed: no balance term
    balance_coef = cfg.aux_loss_coef if r.aux_coef is None else r.aux_coef  # relu: its lambda

    def in_aux(coef) -> bool:
        return isinstance(coef, Tensor) or bool(coef)

    def term(coef, fn) -> Tensor:
        # a term left out of aux is a statistic only: no autograd graph to build and walk back
        with torch.set_grad_enabled(torch.is_grad_enabled() and in_aux(coef)):
            return fn()

    balance = (term(balance_coef, lambda: _balance(call, E))
               if r.indices_TK is not None and any_tokens and not balanced else zero)
    z = zero if cfg.router == "hash" else term(cfg.z_loss_coef, lambda: L.z_loss(r.logits_TE, call.mask_T))
    importance = (term(cfg.importance_loss_coef, lambda: _importance(call, E))
                  if any_tokens and cfg.router != "hash" else zero)  # hash: no aux loss
    aux = zero
    for coef, value in ((balance_coef, balance), (cfg.z_loss_coef, z), (cfg.importance_loss_coef, importance)):
        if in_aux(coef):
            aux = aux + coef * value
    if cfg.router == "top_p" and cfg.entropy_loss_coef and any_tokens:  # the paper's dynamic loss
        aux = aux + cfg.entropy_loss_coef * _entropy(call, any_tokens, differentiable=True)
    with torch.no_grad():
        entropy = _entropy(call, any_tokens)
    option_aux, options = option_terms(call, cfg, any_tokens)
    if option_aux is not None:
        aux = aux + option_aux
    stats = MoEStats(
        tokens_per_expert=call.counts_E.detach(),
        dropped=call.dropped.detach(),
        num_assignments=torch.as_tensor(call.num_assignments, device=call.counts_E.device),
        num_tokens=call.num_tokens,
        balance_loss=balance.detach(),
        z_loss=z.detach(),
        importance_loss=importance.detach(),
        router_entropy=entropy,
        **options,
    )
    return aux, stats
