"""Mixture of attention heads (JetMoE's MoA): each token routes to K of E attention experts.

Legend: B batch, S query length, L key length (cache + S), D model dim, E attention experts, K experts
per token, h kv heads, d head dim, T = B S tokens.

Expert e owns a query projection ``w_q[e]`` (h d, D) and an output projection ``w_o[e]`` (D, h d); the
keys and values (``kv_proj``, h heads) are shared by all experts and are what the KV cache holds.
  logits = x router^T;  picks, gates = top-K of logits, softmaxed over the picks
  slot k of a token: q_k = w_q[pick_k] x  -> h heads;   the K slots' h heads attend to the same h kv heads
  o = sum_k gates_k * w_o[pick_k] attn_k  +  bias
Query head k h + j uses kv head j (the kv heads are tiled K times, not interleaved). The routing here is
inference-exact; JetMoE's auxiliary balance loss on this router is not computed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.nn.attention import KVCache, apply_rope
from moekit.nn.linear import Linear

__all__ = ["MixtureOfAttention"]


class MixtureOfAttention(nn.Module):
    """Causal MoA with RoPE; same call as moekit.nn.attention.Attention."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_experts, self.top_k, self.n_kv_heads, self.head_dim = num_experts, top_k, n_kv_heads, head_dim
        inner = n_kv_heads * head_dim
        self.router = Linear(d_model, num_experts, bias=False)
        self.w_q = nn.Parameter(torch.empty(num_experts, inner, d_model))
        self.w_o = nn.Parameter(torch.empty(num_experts, d_model, inner))
        self.bias = nn.Parameter(torch.zeros(d_model))
        self.kv_proj = Linear(d_model, 2 * inner, bias=False)

    def _route(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        top_TK, picks_TK = (x_TD.float() @ self.router.weight.float().t()).topk(self.top_k, dim=-1)
        return picks_TK, top_TK.softmax(dim=-1).to(x_TD.dtype)

    def _per_expert(self, w_E: Tensor, x_TKi: Tensor, picks_TK: Tensor) -> Tensor:
        """y[t, k] = w_E[picks[t, k]] @ x[t, k], one expert at a time."""
        out = x_TKi.new_zeros(*picks_TK.shape, w_E.shape[1])
        for e in picks_TK.unique().tolist():
            sel = picks_TK == e
            out[sel] = x_TKi[sel] @ w_E[e].t()
        return out

    def forward(self, x_BSD: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None = None, layer_idx: int = 0) -> Tensor:
        B, S, D = x_BSD.shape
        K, h, d = self.top_k, self.n_kv_heads, self.head_dim
        x_TD = x_BSD.reshape(B * S, D)
        picks_TK, gates_TK = self._route(x_TD)
        # 1. each slot's queries from its expert; shared keys and values
        q_TKi = self._per_expert(self.w_q, x_TD.unsqueeze(1).expand(B * S, K, D), picks_TK)
        q = q_TKi.view(B, S, K * h, d).transpose(1, 2)  # head k h + j: slot k, kv head j
        k, v = (t.view(B, S, h, d).transpose(1, 2) for t in self.kv_proj(x_BSD).chunk(2, dim=-1))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        # 2. attention, the h kv heads tiled over the K slots
        is_causal = mask is None and k.shape[2] == S
        o = F.scaled_dot_product_attention(q, k.repeat(1, K, 1, 1), v.repeat(1, K, 1, 1), attn_mask=mask,
                                           is_causal=is_causal)
        # 3. each slot's output projection, weighted by its gate, summed over the slots
        o_TKi = o.transpose(1, 2).reshape(B * S, K, h * d)
        y_TKD = self._per_expert(self.w_o, o_TKi, picks_TK) * gates_TK.unsqueeze(-1)
        return (y_TKD.sum(dim=1) + self.bias).view(B, S, D)
