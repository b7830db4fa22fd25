"""Soft MoE (Puigcerver et al. 2023, vmoe semantics) as pure functions: every slot is a convex mixture
of a group's tokens, every output a convex mixture of the slots.

Legend: B groups (sequences), M tokens per group, D model dim, N slots (E experts x s slots each).

Not causal: a slot mixes every token of its group, so a token's output depends on later tokens. A
group is one sequence; the layer is meant for encoders, not for autoregressive decoders.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["soft_logits", "soft_dispatch_combine"]


def _l2_normalize(v: Tensor, dim: int, eps: float = 1e-6) -> Tensor:
    return v * torch.rsqrt(v.square().sum(dim=dim, keepdim=True) + eps)


def soft_logits(x_BMD: Tensor, phi_ND: Tensor, scale: Tensor) -> Tensor:
    """(B, M, N) logits = normalise(x) . (scale * normalise(phi)), both L2-normalised over D."""
    return torch.einsum("bmd,nd->bmn", _l2_normalize(x_BMD, -1), scale * _l2_normalize(phi_ND, -1))


def soft_dispatch_combine(logits_BMN: Tensor, mask_BM: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(dispatch, combine), both (B, M, N): dispatch = softmax over the tokens of a group (each slot's
    column sums to 1 over the real tokens; padding gets 0), combine = softmax over all slots (each
    token's row sums to 1). A group with no real token dispatches nothing (zeros, not NaN)."""
    if mask_BM is None:
        return logits_BMN.softmax(dim=1), logits_BMN.softmax(dim=2)
    m_BM1 = mask_BM.unsqueeze(-1)
    masked_BMN = logits_BMN.masked_fill(~m_BM1, float("-inf"))
    any_B11 = mask_BM.any(dim=1).view(-1, 1, 1)
    dispatch_BMN = torch.where(any_B11, masked_BMN, 0).softmax(dim=1)
    return torch.where(m_BM1, dispatch_BMN, 0), logits_BMN.softmax(dim=2)
