"""Top-k routing over the E routed experts plus X null / zero-computation experts, as a pure function.

Legend: T tokens, E routed experts, X extra experts (ids E .. E+X-1: null first, then zero, copy and
constant, as :data:`moekit.config.moe_options.EXTRA_EXPERT_FIELDS` orders them), K top-k.

Null experts (AdaMoE, arXiv 2406.13233) output 0 and take no share of the combine weights: a token's
weights are renormalised over the experts it chose that are not null, so a token that chose only null
experts outputs exactly 0. Zero-computation experts (MoE++, arXiv 2410.07348) are weighted like any
routed expert; the layer computes them without a matmul.
"""
from __future__ import annotations

import torch
from torch import Tensor

from moekit.functional.routing import Routing, pick_topk

__all__ = ["extra_topk_route"]


def extra_topk_route(logits_TX: Tensor, k: int, num_experts: int, num_null: int, *, normalize: bool,
                     picks_TK: Tensor | None = None) -> Routing:
    """p = softmax over all E + X logits; top-k of p; the null picks' weights are 0 and, when
    ``normalize``, the others are divided by their sum (0 stays 0 for a null-only token).
    ``probs_TE`` is the full (T, E+X) p: the balance loss covers every expert, null ones included.
    ``picks_TK``: replay these choices (:func:`moekit.functional.routing.pick_topk`)."""
    probs_TX = logits_TX.softmax(dim=-1)
    weights_TK, indices_TK = pick_topk(probs_TX, k, picks_TK)
    null_TK = (indices_TK >= num_experts) & (indices_TK < num_experts + num_null)
    weights_TK = weights_TK.masked_fill(null_TK, 0.0)
    if normalize:
        total_T1 = weights_TK.sum(dim=-1, keepdim=True)
        weights_TK = weights_TK / torch.where(total_T1 > 0, total_T1, torch.ones_like(total_T1))
    return Routing(logits_TX, probs_TX, indices_TK, weights_TK)
