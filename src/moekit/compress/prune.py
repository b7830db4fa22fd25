"""Expert pruning: score each layer's experts on calibration tokens, keep the N best, slice the weights.

Legend: T tokens, D model dim, E experts, N experts kept, A assignments.

Scores (higher = keep), from one pass of the unpruned model:
  ``frequency``  assignments routed to expert e (dropped ones excluded);
  ``reap``       REAP (Lasby et al. 2025, arXiv 2510.13999): mean over the assignments routed to e of
                 gate_weight * ||expert_e(x)||_2, the router-weighted size of what the expert adds. An
                 expert that receives no token scores 0.
The pruned layer keeps its experts' order; router rows, the noise and bias rows of the router, and the
expert slices are cut together, so the router's softmax / sigmoid runs over the kept experts only.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from moekit.functional.dispatch import expert_ffn
from moekit.nn.experts import GroupedExperts
from moekit.nn.moe import MoELayer

__all__ = ["METHODS", "expert_scores", "kept_experts", "prune_model", "pruned_config"]

METHODS = ("frequency", "reap")


class _Scorer(nn.Module):
    """Wraps a GroupedExperts: accumulates per-expert assignment counts and REAP sums, then computes as usual."""

    def __init__(self, inner: GroupedExperts):
        super().__init__()
        self.inner = inner
        E = inner.num_experts
        self.count_E = torch.zeros(E, dtype=torch.float64)
        self.reap_E = torch.zeros(E, dtype=torch.float64)

    def forward(self, x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor) -> Tensor:
        m = self.inner
        for e in range(m.num_experts):
            sel = expert_A == e
            n = int(sel.sum())
            if n == 0:
                continue
            y_nD = expert_ffn(x_TD[token_A[sel]], None if m.w_gate is None else m.w_gate[e], m.w_up[e], m.w_down[e],
                              m.activation)
            self.count_E[e] += n
            self.reap_E[e] += (weight_A[sel].double() * y_nD.double().norm(dim=-1)).sum()
        return m(x_TD, token_A, expert_A, weight_A)


def _moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]


@torch.no_grad()
def expert_scores(model: nn.Module, batches: Iterable[Tensor], method: str) -> dict[str, Tensor]:
    """MoE layer name -> (E,) float64 scores by ``method`` (module docstring), over ``batches`` of ids."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; choose one of {', '.join(METHODS)}")
    layers = _moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layer to prune")
    scorers = {}
    for name, layer in layers:
        scorers[name] = _Scorer(layer.experts)
        layer.experts = scorers[name]
    try:
        for x in batches:
            model(x)
    finally:
        for name, layer in layers:
            layer.experts = scorers[name].inner
    if method == "frequency":
        return {n: s.count_E for n, s in scorers.items()}
    return {n: s.reap_E / s.count_E.clamp_min(1) for n, s in scorers.items()}


def pruned_config(cfg, keep: int):
    """The ModelConfig with ``keep`` experts per MoE layer (top_k clamped to ``keep``, with a warning)."""
    moe = cfg.moe
    E = moe.num_experts
    if not 1 <= keep < E:
        raise ValueError(f"--keep {keep} must be in [1, {E - 1}] (the model has {E} experts per layer)")
    if moe.n_group > 1 and keep % moe.n_group:
        raise ValueError(f"--keep {keep} must be a multiple of n_group={moe.n_group} (group-limited routing)")
    top_k = moe.top_k
    if moe.router != "expert_choice" and top_k > keep:
        warnings.warn(f"top_k={top_k} > --keep {keep}: top_k clamped to {keep}", stacklevel=2)
        top_k = keep
    return cfg.replace(moe=moe.replace(num_experts=keep, top_k=top_k))


@torch.no_grad()
def prune_model(model: nn.Module, scores: dict[str, Tensor], keep: int) -> nn.Module:
    """A new model with the ``keep`` best-scoring experts of each MoE layer (ties: lower index first)."""
    from moekit.nn.transformer import MoETransformer

    cfg = pruned_config(model.config, keep)
    state = model.state_dict()
    for name, _ in _moe_layers(model):
        s = scores[name]
        # a stable descending sort: equal scores keep the lower expert index
        kept = torch.tensor(kept_experts(s, keep))
        for key in list(state):
            if key.startswith((name + ".router.", name + ".experts.")):
                state[key] = state[key].index_select(0, kept).clone()
    pruned = MoETransformer(cfg)
    pruned.load_state_dict(state, strict=True)
    # an HF source config (model.hf_config) would still name E experts: the pruned model converts from its own
    return pruned.eval()


def kept_experts(scores: Tensor, keep: int) -> list[int]:
    """The expert ids ``prune_model`` keeps for one layer's scores."""
    return sorted(torch.argsort(-scores, stable=True)[:keep].tolist())
