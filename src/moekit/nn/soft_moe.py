"""The Soft MoE forward of an :class:`~moekit.nn.moe.MoELayer` with ``router="soft"``: slots instead of
token assignments (see :mod:`moekit.functional.routing_soft`; not causal).

Legend: B groups (sequences), M tokens per group, D model dim, E experts, s slots per expert,
N = E * s slots per group.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moekit.functional.routing_soft import soft_dispatch_combine, soft_logits
from moekit.functional.stats import MoEStats

if TYPE_CHECKING:
    from moekit.nn.moe import MoELayer

__all__ = ["soft_moe_forward"]


def _groups(x: Tensor) -> tuple[int, int]:
    """(B, M): a (..., M, D) input is groups of its last token dim; a single token is one group."""
    if x.dim() == 1:
        return 1, 1
    return x.shape[:-2].numel(), x.shape[-2]


def soft_moe_forward(layer: MoELayer, x: Tensor, token_mask: Tensor | None) -> tuple[Tensor, Tensor, MoEStats]:
    """(output, aux_loss = 0, stats). Stats count slots: each expert computes B * s rows."""
    cfg = layer.cfg
    E, s, D = cfg.num_experts, cfg.slots_per_expert, cfg.d_model
    B, M = _groups(x)
    N = E * s
    x_BMD = x.reshape(B, M, D)
    mask_BM = None if token_mask is None else token_mask.reshape(B, M).to(torch.bool)
    if mask_BM is not None:
        x_BMD = torch.where(mask_BM.unsqueeze(-1), x_BMD, 0)  # padding content never matters
    rdtype = torch.promote_types(x.dtype, torch.float32)
    # 1. logits, dispatch and combine weights in fp32
    x32_BMD = x_BMD.to(rdtype)
    logits_BMN = soft_logits(x32_BMD, layer.router.weight.to(rdtype), layer.router.soft_scale.to(rdtype))
    dispatch_BMN, combine_BMN = soft_dispatch_combine(logits_BMN, mask_BM)
    # 2. slot inputs: mixtures of the un-normalised tokens
    slots_BND = torch.einsum("bmn,bmd->bnd", dispatch_BMN, x32_BMD).to(x.dtype)
    # 3. each expert runs on its s slots of every group (slot n belongs to expert n // s)
    rows = slots_BND.reshape(B * N, D)
    dev = x.device
    expert_A = torch.arange(N, device=dev).div(s, rounding_mode="floor").repeat(B)
    weight_A = torch.ones(B * N, dtype=rdtype, device=dev)
    y_rows, _ = layer.dispatcher(rows, torch.arange(B * N, device=dev), expert_A, weight_A, layer.experts)
    # 4. outputs: mixtures of the slot outputs
    y_BMD = torch.einsum("bmn,bnd->bmd", combine_BMN, y_rows.reshape(B, N, D).to(rdtype)).to(x.dtype)
    x_flat = x_BMD.reshape(B * M, D)
    if layer.shared_experts is not None:
        y_BMD = y_BMD + layer.shared_experts(x_flat).reshape(B, M, D)
    if mask_BM is not None:
        y_BMD = torch.where(mask_BM.unsqueeze(-1), y_BMD, 0)
    n = B * M if mask_BM is None else mask_BM.sum()
    with torch.no_grad():
        ent_BM = torch.special.entr(combine_BMN).sum(-1)
        entropy = ent_BM.mean() if mask_BM is None else torch.where(mask_BM, ent_BM, 0).sum() / mask_BM.sum().clamp_min(1)
    zero = logits_BMN.new_zeros(())
    stats = MoEStats(
        tokens_per_expert=torch.full((E,), B * s, dtype=torch.long, device=dev),
        dropped=torch.zeros((), dtype=torch.long, device=dev),
        num_assignments=torch.tensor(B * N, device=dev),
        num_tokens=n if (torch.compiler.is_compiling() or not isinstance(n, Tensor)) else int(n),
        balance_loss=zero, z_loss=zero, importance_loss=zero, router_entropy=entropy)
    return y_BMD.reshape(x.shape), zero, stats
