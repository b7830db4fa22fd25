"""Balancing losses as pure functions.

Legend: T tokens, E experts, K top-k, B sequences.
"""
from __future__ import annotations

import torch
from torch import Tensor

from moekit.functional.routing import expert_counts

__all__ = ["load_balancing_loss", "sequence_balancing_loss", "z_loss", "importance_loss", "cv_squared",
           "expert_bias_update"]


def load_balancing_loss(probs: Tensor, expert_indices: Tensor, num_experts: int, mask: Tensor | None = None) -> Tensor:
    """Switch/GShard balance loss E * sum_e f_e * P_e.

    probs: (T, E) router probabilities; expert_indices: (T, K) chosen experts (before any drop).
    f_e = share of the T*K assignments that go to e, P_e = mean over tokens of p_e.
    1.0 for uniform routing, E for total collapse onto one expert.
    mask: optional (T,) bool, False = padding: left out, as if its rows were not there.
    """
    if mask is not None:
        m_T1 = mask.unsqueeze(1)
        n = mask.sum().clamp_min(1).to(probs.dtype)
        counts_E = expert_counts(expert_indices.masked_fill(~m_T1, num_experts), num_experts).to(probs.dtype)
        f_E = counts_E / (n * expert_indices.shape[1])
        P_E = torch.where(m_T1, probs, 0).sum(dim=0) / n
        return num_experts * (f_E * P_E).sum()
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    counts_E = expert_counts(expert_indices, num_experts).to(probs.dtype)
    f_E = counts_E / expert_indices.numel()
    P_E = probs.mean(dim=0)
    return num_experts * (f_E * P_E).sum()


def sequence_balancing_loss(probs: Tensor, expert_indices: Tensor, seq_ids: Tensor, num_seqs: int,
                            num_experts: int, mask: Tensor | None = None) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss: the balance loss per sequence, averaged over sequences.

    probs: (T, E); expert_indices: (T, K); seq_ids: (T,) sequence of each token.
    Sequences with no tokens are left out of the mean. mask: optional (T,) bool, False = padding.
    """
    if mask is not None:  # padding goes to an extra sequence that is then left out
        seq_ids = seq_ids.masked_fill(~mask, num_seqs)
        probs = torch.where(mask.unsqueeze(1), probs, 0)
        num_seqs_all = num_seqs + 1
    else:
        num_seqs_all = num_seqs
    T, E = probs.shape
    K = expert_indices.shape[1]
    if T == 0:
        return probs.new_zeros(())
    tokens_B = expert_counts(seq_ids, num_seqs_all).to(probs.dtype)  # tokens per sequence
    counts_BE = torch.zeros(num_seqs_all, E, dtype=probs.dtype, device=probs.device)
    counts_BE.index_put_((seq_ids.repeat_interleave(K), expert_indices.reshape(-1)),
                         torch.ones((), dtype=probs.dtype, device=probs.device).expand(T * K), accumulate=True)
    P_BE = torch.zeros(num_seqs_all, E, dtype=probs.dtype, device=probs.device).index_add(0, seq_ids, probs)
    tokens_B, counts_BE, P_BE = tokens_B[:num_seqs], counts_BE[:num_seqs], P_BE[:num_seqs]
    present_B = tokens_B > 0
    denom_B = tokens_B.clamp_min(1)
    f_BE = counts_BE / (denom_B * K).unsqueeze(1)
    P_BE = P_BE / denom_B.unsqueeze(1)
    per_seq_B = num_experts * (f_BE * P_BE).sum(dim=1)
    # mean over present sequences, with static shapes (0 when every token is padding)
    return (per_seq_B * present_B).sum() / present_B.sum().clamp_min(1)


def z_loss(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(l)^2. logits: (T, E); mask: optional (T,)
    bool, False = padding (left out of the mean)."""
    if mask is not None:
        z_T = torch.where(mask, torch.logsumexp(logits, dim=-1).square(), 0)
        return z_T.sum() / mask.sum().clamp_min(1).to(logits.dtype)
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits, dim=-1).square().mean()


def importance_loss(gates: Tensor) -> Tensor:
    """Shazeer 2017 importance loss: squared coefficient of variation of per-expert gate sums.

    gates: (T, E) combine weights, zero where an expert was not chosen. Population variance.
    """
    return cv_squared(gates.sum(dim=0))


def cv_squared(importance_E: Tensor) -> Tensor:
    """Squared coefficient of variation var / (mean^2 + 1e-10) of per-expert sums (population variance)."""
    mean = importance_E.mean()
    var = importance_E.var(unbiased=False)
    return var / (mean.square() + 1e-10)


def expert_bias_update(bias: Tensor, tokens_per_expert: Tensor, rate: float) -> Tensor:
    """Aux-loss-free balancing (DeepSeek-V3): bias + rate * sign(mean_load - load_e)."""
    load_E = tokens_per_expert.to(bias.dtype)
    return bias + rate * torch.sign(load_E.mean() - load_E)
