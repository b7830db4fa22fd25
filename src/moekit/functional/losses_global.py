"""Global-batch load balancing (Qiu et al. 2025, Qwen3) as a pure function.

Legend: T tokens of this micro-batch, E experts, K top-k.

The micro-batch balance loss E * sum_e f_e * P_e takes f_e from the micro-batch's own picks, so a
micro-batch that is all code and one that is all prose are each pushed to spread their tokens evenly.
The global form takes f_e from the counts summed over every micro-batch of the optimizer step and every
data-parallel rank (f carries no gradient), while P_e stays this micro-batch's mean router probability.
With one micro-batch on one rank the two are equal.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["global_balancing_loss"]


def global_balancing_loss(probs_TE: Tensor, global_counts_E: Tensor, num_experts: int,
                          mask_T: Tensor | None = None) -> Tensor:
    """E * sum_e f_e * P_e with f_e = global_counts_E[e] / sum(global_counts_E) (the picks of the whole
    step, before drops) and P_e = the mean over this micro-batch's real tokens of p_e.
    probs_TE: (T, E); global_counts_E: (E,) summed over micro-batches and ranks; mask_T: False = padding."""
    counts_E = global_counts_E.detach().to(probs_TE.dtype)
    f_E = counts_E / counts_E.sum().clamp_min(1)
    if mask_T is not None:
        probs_TE = torch.where(mask_T.unsqueeze(1), probs_TE, 0)
        n = mask_T.sum().clamp_min(1).to(probs_TE.dtype)
    else:
        n = max(probs_TE.shape[0], 1)
    P_E = probs_TE[:, :num_experts].sum(dim=0) / n
    return num_experts * (f_E * P_E).sum()
