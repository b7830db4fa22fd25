"""The router module: holds the router weights and calls the pure routing functions.

Legend: T tokens, D model dim, E experts, K top-k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.functional import routing as R
from moekit.functional import routing_balanced as RB
from moekit.functional import routing_dynamic as RD
from moekit.functional import routing_extra as RX
from moekit.functional import routing_sparsemixer as RS
from moekit.nn.init import init_weights_
from moekit.ops.softmax import router_softmax

__all__ = ["Router"]


class Router(nn.Module):
    """Scores tokens against experts in fp32, whatever the input dtype.

    Parameters: ``weight`` (E, D) ((E * slots_per_expert, D) for ``soft``: one row per slot, with
    ``soft_scale``); ``w_noise`` (E, D) for ``noisy_topk``; buffer ``expert_bias`` (E,) for
    ``sigmoid_bias`` (chooses experts, receives no gradient, updated by ``update_expert_bias``); see
    ``_init_new_routers`` for hierarchical, relu and hash. The soft router is not called: Soft MoE
    mixes slots in :mod:`moekit.nn.soft_moe`.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E, D = cfg.num_experts, cfg.d_model
        # soft: one row per slot (Soft MoE's phi), and its learnable scale
        self.weight = nn.Parameter(torch.empty(E * cfg.slots_per_expert if cfg.router == "soft" else E, D))
        self.soft_scale = nn.Parameter(torch.ones(())) if cfg.router == "soft" else None
        self.w_noise = nn.Parameter(torch.zeros(E, D)) if cfg.router == "noisy_topk" else None
        self.bias = nn.Parameter(torch.zeros(E)) if cfg.router_bias else None  # gpt-oss: logits + bias
        if cfg.router == "sigmoid_bias":
            self.register_buffer("expert_bias", torch.zeros(E))
        else:
            self.expert_bias = None
        self._init_new_routers(cfg)
        # null / zero-computation experts: their own logits rows (AdaMoE's separate linear)
        X = cfg.num_extra_experts
        self.extra_weight = nn.Parameter(torch.empty(X, D)) if X else None
        self.reset_parameters()

    def _init_new_routers(self, cfg: MoEConfig) -> None:
        """hierarchical: ``group_weight`` (G, D), the outer gate (``weight`` is the inner gates, group by
        group). relu: buffer ``relu_l1`` (), ReMoE's lambda, fp32 whatever the module dtype. hash: buffer
        ``hash_table`` (V,) int64."""
        G = cfg.num_expert_groups
        self.group_weight = nn.Parameter(torch.empty(G, cfg.d_model)) if cfg.router == "hierarchical" else None
        self.register_buffer("relu_l1", torch.tensor(cfg.relu_l1_init, dtype=torch.float32)
                             if cfg.router == "relu" else None)
        self.register_buffer("hash_table", None)
        if cfg.router in ("sinkhorn", "base"):
            RB.host_steps()
        if cfg.router == "hash":
            if cfg.hash_vocab_size is None:
                raise ValueError("router='hash' needs hash_vocab_size (the table's length; a ModelConfig "
                                 "fills it from vocab_size)")
            self.register_buffer("hash_table", RB.hash_table(cfg.hash_vocab_size, cfg.num_experts, cfg.hash_seed))

    def _apply(self, fn, recurse=True):
        # ReMoE's lambda stays fp32 (a bf16 cast would round every x1.2 step): keep the value, follow the device
        l1 = self.relu_l1
        super()._apply(fn, recurse)
        if l1 is not None:
            self.relu_l1 = l1.to(self.relu_l1.device, torch.float32)
        return self

    def reset_parameters(self, std: float | None = None) -> None:
        """:func:`moekit.nn.init.init_weights_`: weight N(0, std or 1/sqrt(D)), w_noise 0, expert_bias 0."""
        init_weights_(self, std)

    def forward(self, x_TD: Tensor, generator: torch.Generator | None = None,
                token_ids: Tensor | None = None, picks_TK: Tensor | None = None) -> R.Routing:
        """Route the rows of ``x_TD``. In training, router jitter and noisy_topk's noise are drawn from
        ``generator`` (torch's global RNG when None): jitter first, one U(1-eps, 1+eps) per input element,
        then one N(0, 1) per (token, expert), each in the routing dtype. ``picks_TK``: routing replay,
        these experts instead of the top-k (top-k routers only)."""
        cfg = self.cfg
        # at least fp32 (bf16/fp16 inputs are upcast; float64 stays float64 for gradcheck)
        rdtype = torch.promote_types(x_TD.dtype, torch.float32)
        x32_TD = x_TD.to(rdtype)
        if self.training and cfg.router_jitter > 0:
            eps = cfg.router_jitter
            x32_TD = x32_TD * torch.empty_like(x32_TD).uniform_(1.0 - eps, 1.0 + eps, generator=generator)
        w_ED = self.weight
        logits_TE = F.linear(x32_TD, w_ED) if w_ED.dtype == rdtype else x32_TD @ w_ED.to(rdtype).t()
        if self.bias is not None:
            logits_TE = logits_TE + self.bias.to(rdtype)
        if cfg.router in _NEW_ROUTES:
            return _NEW_ROUTES[cfg.router](self, logits_TE, x32_TD, token_ids)
        if self.extra_weight is not None:  # logits over E + X (null experts first)
            logits_TX = torch.cat([logits_TE, x32_TD @ self.extra_weight.to(rdtype).t()], dim=-1)
            return RX.extra_topk_route(logits_TX, cfg.top_k, cfg.num_experts, cfg.num_null_experts,
                                       normalize=cfg.norm_topk, picks_TK=picks_TK)
        if cfg.router in ("topk", "switch"):
            return R.topk_route(logits_TE, cfg.top_k, normalize=cfg.norm_topk and cfg.router == "topk",
                                picks_TK=picks_TK, probs_TE=router_softmax(logits_TE))
        if cfg.router == "noisy_topk":
            std_TE = F.softplus(x32_TD @ self.w_noise.to(rdtype).t()) if self.training else None
            return R.noisy_topk_route(logits_TE, std_TE, cfg.top_k, generator, picks_TK=picks_TK)
        if cfg.router == "sigmoid_bias":
            return R.sigmoid_bias_route(
                logits_TE, self.expert_bias, cfg.top_k, normalize=cfg.norm_topk,
                scaling=cfg.routed_scaling_factor, n_group=cfg.n_group, topk_group=cfg.topk_group,
                score_func=cfg.score_func, group_score=cfg.group_score, group_top=cfg.group_top,
                picks_TK=picks_TK,
            )
        if cfg.router == "expert_choice":
            return R.expert_choice_route(logits_TE, cfg.top_k, cfg.capacity_factor)
        return R.dense_route(logits_TE)


def _hash(router: Router, logits_TE: Tensor, x_TD: Tensor, token_ids: Tensor | None) -> R.Routing:
    if token_ids is None:
        raise ValueError("router='hash' routes by token id: call the layer as layer(x, token_ids=ids)")
    zeros_TE = (logits_TE * 0).detach() + (x_TD.sum(-1, keepdim=True) * 0).detach()  # NaN tokens still show
    return RB.hash_route(token_ids, router.hash_table, router.cfg.num_experts, zeros_TE)


def _hierarchical(router: Router, logits_TE: Tensor, x_TD: Tensor, token_ids: Tensor | None) -> R.Routing:
    outer_TG = x_TD @ router.group_weight.to(x_TD.dtype).t()
    return RD.hierarchical_route(outer_TG, logits_TE, router.cfg.group_top_k, router.cfg.top_k)


# the routers of moekit.functional.routing_dynamic / routing_balanced: name -> (router, l, x, ids) -> Routing
_NEW_ROUTES = {
    "top_p": lambda r, l, x, ids: RD.top_p_route(l, r.cfg.top_p, rule=r.cfg.top_p_rule, max_k=r.cfg.max_k),
    "relu": lambda r, l, x, ids: RD.relu_route(l, r.relu_l1),
    "hierarchical": _hierarchical,
    "sinkhorn": lambda r, l, x, ids: RB.sinkhorn_route(l, r.cfg.top_k, training=r.training,
                                                       max_iter=r.cfg.sinkhorn_max_iter, tol=r.cfg.sinkhorn_tol),
    "base": lambda r, l, x, ids: RB.base_route(l, training=r.training),
    "hash": _hash,
    "sparsemixer": lambda r, l, x, ids: RS.sparsemixer_route(l, r.cfg.sparsemixer_eps),
}
