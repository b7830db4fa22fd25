"""The router module: holds the router weights and calls the pure routing functions.

Legend: T tokens, D model dim, E experts, K top-k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.functional import routing as R
from moekit.nn.init import init_weights_

__all__ = ["Router"]


class Router(nn.Module):
    """Scores tokens against experts in fp32, whatever the input dtype.

    Parameters: ``weight`` (E, D); ``w_noise`` (E, D) for ``noisy_topk``; buffer ``expert_bias`` (E,)
    for ``sigmoid_bias`` (chooses experts, receives no gradient, updated by ``update_expert_bias``).
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E, D = cfg.num_experts, cfg.d_model
        self.weight = nn.Parameter(torch.empty(E, D))
        self.w_noise = nn.Parameter(torch.zeros(E, D)) if cfg.router == "noisy_topk" else None
        if cfg.router == "sigmoid_bias":
            self.register_buffer("expert_bias", torch.zeros(E))
        else:
            self.expert_bias = None
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        """:func:`moekit.nn.init.init_weights_`: weight N(0, std or 1/sqrt(D)), w_noise 0, expert_bias 0."""
        init_weights_(self, std)

    def forward(self, x_TD: Tensor, generator: torch.Generator | None = None) -> R.Routing:
        """Route the rows of ``x_TD``. In training, router jitter and noisy_topk's noise are drawn from
        ``generator`` (torch's global RNG when None): jitter first, one U(1-eps, 1+eps) per input element,
        then one N(0, 1) per (token, expert), each in the routing dtype."""
        cfg = self.cfg
        # at least fp32 (bf16/fp16 inputs are upcast; float64 stays float64 for gradcheck)
        rdtype = torch.promote_types(x_TD.dtype, torch.float32)
        x32_TD = x_TD.to(rdtype)
        if self.training and cfg.router_jitter > 0:
            eps = cfg.router_jitter
            x32_TD = x32_TD * torch.empty_like(x32_TD).uniform_(1.0 - eps, 1.0 + eps, generator=generator)
        logits_TE = x32_TD @ self.weight.to(rdtype).t()
        if cfg.router in ("topk", "switch"):
            return R.topk_route(logits_TE, cfg.top_k, normalize=cfg.norm_topk and cfg.router == "topk")
        if cfg.router == "noisy_topk":
            std_TE = F.softplus(x32_TD @ self.w_noise.to(rdtype).t()) if self.training else None
            return R.noisy_topk_route(logits_TE, std_TE, cfg.top_k, generator)
        if cfg.router == "sigmoid_bias":
            return R.sigmoid_bias_route(
                logits_TE, self.expert_bias, cfg.top_k, normalize=cfg.norm_topk,
                scaling=cfg.routed_scaling_factor, n_group=cfg.n_group, topk_group=cfg.topk_group,
                score_func=cfg.score_func,
            )
        if cfg.router == "expert_choice":
            return R.expert_choice_route(logits_TE, cfg.top_k, cfg.capacity_factor)
        return R.dense_route(logits_TE)
