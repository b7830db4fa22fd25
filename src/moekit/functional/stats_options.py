"""The balancing terms and statistics that options on the routers add to one MoE call: DeepSeek-V2's
device and communication losses, the quantile-balancing bias target, and the loads of the null and
zero-computation experts. Called by :func:`moekit.functional.stats.losses_and_stats`.

Legend: T tokens, E routed experts, X null / zero-computation experts, K top-k.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moekit.config import MoEConfig
from moekit.config.moe_options import EXTRA_EXPERT_FIELDS
from moekit.functional.bias_update import quantile_bias_target
from moekit.functional.losses_device import comm_balance_loss, device_balance_loss

__all__ = ["extra_kinds", "option_terms"]


def extra_kinds(cfg: MoEConfig) -> tuple[str, ...]:
    """The kind of each extra expert id E, E+1, ... ("null", "zero", "copy", "constant")."""
    return tuple(kind for name, kind in EXTRA_EXPERT_FIELDS for _ in range(getattr(cfg, name)))


def option_terms(call: Any, cfg: MoEConfig, any_tokens: bool) -> tuple[Tensor | None, dict[str, Any]]:
    """(what the options add to ``aux`` or None, extra :class:`MoEStats` fields) for a ``RoutedCall``."""
    r = call.routing
    E = cfg.num_experts
    aux = None
    out: dict[str, Any] = {}
    if cfg.num_devices > 1 and r.indices_TK is not None and any_tokens:
        dev = device_balance_loss(r.probs_TE, r.indices_TK, E, cfg.num_devices, call.mask_T)
        comm = comm_balance_loss(r.probs_TE, r.indices_TK, E, cfg.num_devices, cfg.topk_group, call.mask_T)
        for coef, term in ((cfg.device_loss_coef, dev), (cfg.comm_loss_coef, comm)):
            if coef:
                aux = coef * term if aux is None else aux + coef * term
        out.update(device_loss=dev.detach(), comm_loss=comm.detach())
    bias = getattr(call, "expert_bias", None)
    if cfg.bias_update == "quantile" and bias is not None:
        with torch.no_grad():
            l_TE = r.logits_TE[:, :E]
            s_TE = l_TE.sigmoid() if cfg.score_func == "sigmoid" else l_TE.softmax(dim=-1)
            out["bias_target"] = quantile_bias_target(s_TE, bias, cfg.top_k, call.mask_T)
    counts = getattr(call, "extra_counts", None)
    if cfg.num_extra_experts and counts is not None:
        out.update(extra_tokens_per_expert=counts.detach(), extra_kinds=extra_kinds(cfg))
    return aux, out
