"""Sparse upcycling (Komatsuzaki et al. 2023): a dense model's FFNs become MoE layers that compute, at
step 0, exactly the dense function.

Legend: D model dim, F dense FFN hidden, E experts, K top-k, G granularity, C = E / G copies, S the experts
a token is routed to, p_e its combine weights.

Layout: expert e = c * G + s is slice s (hidden units [s F/G, (s+1) F/G)) of copy c; each expert has hidden
F / G. G = 1: every expert is a whole copy. A SwiGLU FFN is a sum over its hidden units, so
  dense(x) = sum_s slice_s(x),   and the MoE computes  y = sum_{e in S} p_e * a * slice_{e mod G}(x)
with a the factor folded into every w_down. y = dense(x) iff, for every slice s, a * sum_{e in S, e mod G = s}
p_e = 1. Per router (``start_rule``):

| router | G | router start | why it is exact | a |
|---|---|---|---|---|
| topk (renormalised), noisy_topk, sigmoid_bias (renormalised), dense | 1 | any (random N(0, init_std)) | sum p_e = 1 | 1 |
| topk without renormalising, switch | 1 | zero: p_e = 1/E | sum over K of 1/E = K/E | E/K |
| sigmoid_bias without renormalising | 1 | zero: s_e = sigmoid(0) = 1/2 | K/2 | 2/K |
| topk (renormalised), sigmoid_bias (renormalised) | G | rows equal within a copy (random) | the G slices of a copy score alike, so top-K takes K/G whole copies (K a multiple of G); each slice gets 1/G | G |
| dense | G | rows equal within a copy | every copy's slices share p, so each slice sums to 1/G | G |
| sigmoid_bias without renormalising | G | zero, and expert_bias falling copy by copy | the bias picks the first K/G copies whole; each slice gets (K/G)/2 | 2G/K |

Refused by name: ``expert_choice`` (an expert picks tokens: a token may get no expert or several), a
capacity factor (drops), and, with G > 1, ``switch``, ``topk`` without renormalising and ``noisy_topk``
(ties or noise split a copy's slices).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moekit.nn.experts import MLP
from moekit.nn.moe import MoELayer

__all__ = ["UPCYCLE_ROUTERS", "StartRule", "start_rule", "upcycle_model", "upcycled_config"]

UPCYCLE_ROUTERS = ("topk", "switch", "noisy_topk", "sigmoid_bias", "dense")


@dataclass(frozen=True)
class StartRule:
    router_init: str  # "random" (rows tied within a copy when G > 1) or "zero"
    scale: float  # folded into every w_down
    bias_by_copy: bool = False  # sigmoid_bias: expert_bias falls copy by copy (chooses the first copies)


def start_rule(router: str, norm_topk: bool, E: int, K: int, G: int, router_init: str | None = None) -> StartRule:
    """How the router starts and what the experts' outputs are scaled by (module docstring's table)."""
    if router == "expert_choice":
        raise ValueError("router 'expert_choice' has no exact start: each expert picks its tokens, so a token may "
                         "get no expert or several; choose one of " + ", ".join(UPCYCLE_ROUTERS))
    if router not in UPCYCLE_ROUTERS:
        raise ValueError(f"router {router!r} is unknown; choose one of {', '.join(UPCYCLE_ROUTERS)}")
    if G < 1 or E % G:
        raise ValueError(f"--granularity {G} must divide --experts {E}")
    if router != "dense" and not 1 <= K <= E:
        raise ValueError(f"--top-k {K} must be in [1, {E}]")
    if router == "switch" and K != 1:
        raise ValueError(f"router 'switch' is top-1; got --top-k {K}")
    normalised = router in ("noisy_topk", "dense") or (router in ("topk", "sigmoid_bias") and norm_topk)
    if G > 1:
        if router in ("switch", "noisy_topk") or (router == "topk" and not norm_topk):
            why = "noise picks" if router == "noisy_topk" else "tied scores pick"
            raise ValueError(f"router {router!r}{'' if norm_topk else ' without renormalisation'} has no exact start "
                             f"with --granularity {G}: {why} some slices of a copy and not others; use topk "
                             "(renormalised), sigmoid_bias or dense, or --granularity 1")
        if router != "dense" and K % G:
            raise ValueError(f"--top-k {K} must be a multiple of --granularity {G}: a token takes whole copies")
    if normalised:
        rule = StartRule("random", float(G))
    elif router == "sigmoid_bias":
        rule = StartRule("zero", 2.0 * G / K, bias_by_copy=G > 1)
    else:  # topk without renormalising, switch: p = 1/E each
        rule = StartRule("zero", E / K)
    if router_init is not None and router_init != rule.router_init:
        if rule.router_init == "zero":
            raise ValueError(f"--router-init {router_init}: router {router!r} without renormalisation starts exactly "
                             "only from a zero router")
        rule = StartRule(router_init, rule.scale, rule.bias_by_copy)
        if G > 1 and router != "dense":
            raise ValueError(f"--router-init zero with --granularity {G}: every copy ties, so top-k may split copies")
    return rule


def upcycled_config(cfg, experts: int, top_k: int, granularity: int = 1, router: str = "topk", norm_topk: bool = True):
    """The MoE ModelConfig of a dense ``cfg``: every dense FFN of hidden F becomes ``experts`` of hidden F / G."""
    if not cfg.dense:
        raise ValueError("upcycle needs a dense run (config.json with dense=true, e.g. `moekit train --dense`); "
                         "this run already has MoE layers")
    F = cfg.dense_hidden
    if F % granularity:
        raise ValueError(f"--granularity {granularity} must divide the dense FFN hidden size {F}")
    moe = cfg.moe.replace(d_hidden=F // granularity, num_experts=experts, top_k=top_k if router != "dense" else experts,
                          router=router, norm_topk=norm_topk, activation="swiglu", capacity_factor=None,
                          num_shared_experts=0, routed_scaling_factor=1.0, n_group=1, topk_group=1, router_jitter=0.0)
    return cfg.replace(dense=False, dense_d_hidden=F, moe=moe)


@torch.no_grad()
def _fill_layer(layer: MoELayer, mlp: MLP, G: int, rule: StartRule, std: float, generator: torch.Generator) -> None:
    E, H = layer.experts.num_experts, layer.experts.w_up.shape[1]
    C = E // G
    for e in range(E):
        s = e % G
        hid = slice(s * H, (s + 1) * H)
        layer.experts.w_gate[e].copy_(mlp.gate_proj.weight[hid])
        layer.experts.w_up[e].copy_(mlp.up_proj.weight[hid])
        layer.experts.w_down[e].copy_(mlp.down_proj.weight[:, hid] * rule.scale)
    r = layer.router
    if rule.router_init == "zero":
        r.weight.zero_()
    else:  # one random row per copy, shared by its G slices
        rows = torch.randn(C, r.weight.shape[1], generator=generator) * std
        r.weight.copy_(rows.repeat_interleave(G, dim=0))
    if r.w_noise is not None:
        r.w_noise.zero_()
    if r.expert_bias is not None:
        r.expert_bias.zero_()
        if rule.bias_by_copy:  # copy c gets -c * 1e-3: the first K/G copies are chosen, each whole
            r.expert_bias.copy_(-1e-3 * torch.arange(C, dtype=torch.float32).repeat_interleave(G))


@torch.no_grad()
def upcycle_model(dense: nn.Module, experts: int, top_k: int, granularity: int = 1, router: str = "topk",
                  norm_topk: bool = True, router_init: str | None = None, seed: int = 0) -> nn.Module:
    """The upcycled MoETransformer of a dense one (eval mode); every non-FFN weight is copied unchanged."""
    from moekit.nn.transformer import MoETransformer

    cfg = upcycled_config(dense.config, experts, top_k, granularity, router, norm_topk)
    rule = start_rule(router, norm_topk, experts, cfg.moe.top_k, granularity, router_init)
    model = MoETransformer(cfg)
    state = {k: v for k, v in dense.state_dict().items() if ".ffn." not in k}
    missing = model.load_state_dict(state, strict=False).missing_keys
    if any(".ffn." not in k for k in missing):
        raise ValueError(f"dense and MoE models differ outside the FFNs: {[k for k in missing if '.ffn.' not in k]}")
    gen = torch.Generator().manual_seed(seed)
    for block_moe, block_dense in zip(model.layers, dense.layers):
        if block_moe.is_moe:
            _fill_layer(block_moe.ffn, block_dense.ffn, granularity, rule, cfg.init_std, gen)
        else:
            block_moe.ffn.load_state_dict(block_dense.ffn.state_dict())
    model.upcycle_rule = rule
    return model.eval()
