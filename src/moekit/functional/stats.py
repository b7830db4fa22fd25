"""The balancing terms and routing statistics of one MoE call, as one pure function.

Legend: T tokens (rows routed, padding included when masked), E experts, K top-k, A assignments.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from moekit.config import MoEConfig
from moekit.functional import losses as L
from moekit.functional.routing import Routing

__all__ = ["MoEStats", "RoutedCall", "losses_and_stats"]


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

    @property
    def drop_rate(self) -> Tensor:
        return self.dropped / self.num_assignments.clamp_min(1)

    def to_dict(self) -> dict:
        """Plain Python numbers for logging (syncs: call outside the hot path)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.tolist() if isinstance(v, Tensor) else v
        out["drop_rate"] = float(self.drop_rate)
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


def _balance(call: RoutedCall, E: int) -> Tensor:
    r = call.routing
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
    return L.cv_squared(r.probs_TE.new_zeros(E).index_add(0, expert_A, weight_A))


def _entropy(call: RoutedCall, any_tokens: bool) -> Tensor:
    """Mean router entropy over the real tokens (for sigmoid_bias: of the normalised scores)."""
    entropy_T = torch.special.entr(call.routing.probs_TE).sum(-1)
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
    balance = _balance(call, E) if r.indices_TK is not None and any_tokens else zero
    z = L.z_loss(r.logits_TE, call.mask_T)
    importance = _importance(call, E) if any_tokens else zero
    aux = zero
    for coef, term in ((cfg.aux_loss_coef, balance), (cfg.z_loss_coef, z), (cfg.importance_loss_coef, importance)):
        if coef:
            aux = aux + coef * term
    with torch.no_grad():
        entropy = _entropy(call, any_tokens)
    stats = MoEStats(
        tokens_per_expert=call.counts_E.detach(),
        dropped=call.dropped.detach(),
        num_assignments=torch.as_tensor(call.num_assignments, device=call.counts_E.device),
        num_tokens=call.num_tokens,
        balance_loss=balance.detach(),
        z_loss=z.detach(),
        importance_loss=importance.detach(),
        router_entropy=entropy,
    )
    return aux, stats
