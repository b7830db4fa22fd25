"""DeepSeek-V2's device-level and communication balance losses (arXiv 2405.04434, section 2.2.2).

Legend: T tokens, E experts, K top-k, D devices (contiguous groups of E/D experts), M devices a token
may reach (``topk_group``).

With n real tokens, c_j the tokens choosing expert j and P_j = mean_t p_tj:
  f_j  = E * c_j / (K n)                          (1 everywhere under uniform routing)
  L_dev  = sum_d mean_{j in d}(f_j) * sum_{j in d} P_j
  L_comm = sum_d f''_d * sum_{j in d} P_j,  f''_d = D / (M n) * #{tokens sending to device d}
Both are 1 for uniform routing (a token reaching exactly M devices). Picks of ids >= E (null or
zero-computation experts) live on no device and are not counted; P covers the E routed experts.
"""
from __future__ import annotations

import torch
from torch import Tensor

from moekit.functional.routing import expert_counts

__all__ = ["comm_balance_loss", "device_balance_loss"]


def _counts_and_probs(probs_TE: Tensor, indices_TK: Tensor, num_experts: int,
                      mask_T: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(c_E picks per expert, P_E mean probability, n real tokens), padding left out."""
    probs_TE = probs_TE[:, :num_experts]
    if mask_T is not None:
        indices_TK = indices_TK.masked_fill(~mask_T.unsqueeze(1), num_experts)
        probs_TE = torch.where(mask_T.unsqueeze(1), probs_TE, 0)
        n = mask_T.sum().to(probs_TE.dtype)
    else:
        n = torch.tensor(float(probs_TE.shape[0]), dtype=probs_TE.dtype, device=probs_TE.device)
    n = n.clamp_min(1)
    c_E = expert_counts(indices_TK, num_experts).to(probs_TE.dtype)
    return c_E, probs_TE.sum(dim=0) / n, n


def device_balance_loss(probs_TE: Tensor, indices_TK: Tensor, num_experts: int, num_devices: int,
                        mask_T: Tensor | None = None) -> Tensor:
    """L_dev (without its coefficient): sum over devices of the mean f_j of its experts times their
    summed P_j. probs_TE: (T, >= E); indices_TK: (T, K) picks before drops; mask_T: False = padding."""
    E, D, K = num_experts, num_devices, indices_TK.shape[1]
    c_E, P_E, n = _counts_and_probs(probs_TE, indices_TK, E, mask_T)
    f_E = E * c_E / (K * n)
    return (f_E.view(D, E // D).mean(dim=1) * P_E.view(D, E // D).sum(dim=1)).sum()


def comm_balance_loss(probs_TE: Tensor, indices_TK: Tensor, num_experts: int, num_devices: int,
                      max_devices: int, mask_T: Tensor | None = None) -> Tensor:
    """L_comm (without its coefficient): sum over devices of f''_d (the share of tokens sent to d,
    scaled so M devices per token give 1) times the summed P_j of its experts."""
    E, D, M = num_experts, num_devices, max_devices
    _, P_E, n = _counts_and_probs(probs_TE, indices_TK, E, mask_T)
    device_TK = torch.div(indices_TK, E // D, rounding_mode="floor").clamp_max(D)  # D: no device
    if mask_T is not None:
        device_TK = device_TK.masked_fill(~mask_T.unsqueeze(1), D)
    sent_TD = torch.zeros(indices_TK.shape[0], D + 1, dtype=torch.bool, device=indices_TK.device)
    sent_TD = sent_TD.scatter(1, device_TK, True)[:, :D]
    f_D = D * sent_TD.sum(dim=0).to(P_E.dtype) / (M * n)
    return (f_D * P_E.view(D, E // D).sum(dim=1)).sum()
