"""Multi-head latent attention (DeepSeek-V2/V3): keys and values rebuilt from a small cached latent.

Legend: B batch, S query length, L key length (cache + S), H heads, D model dim,
r kv latent rank (kv_lora_rank), rq query latent rank (q_lora_rank),
n per-head no-RoPE q/k dim (qk_nope_head_dim), p per-head RoPE q/k dim (qk_rope_head_dim), v value head dim.

Per token only the normalised latent c (r) and one RoPE key k_rot (p, shared by all heads) are cached:
  q      = q_proj(x)  or  q_b_proj(q_a_norm(q_a_proj(x)))         (B, S, H, n + p)
  c, k_r = split(kv_a_proj(x), [r, p]);  c = kv_a_norm(c)
  k_nope, v = split(kv_b_proj(c), [n, v]) per head;  k = [k_nope, rope(k_r)] (k_r broadcast over heads)
  o      = o_proj(softmax(q k^T * scale) v)
RoPE uses the 'rotate half' layout of moekit.nn.attention; checkpoints stored in the interleaved layout
are permuted on load (moekit.hf), which leaves every q.k product unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MLAConfig
from moekit.nn.attention import KVCache, RMSNorm, apply_rope
from moekit.nn.linear import Linear

__all__ = ["MultiHeadLatentAttention"]


class MultiHeadLatentAttention(nn.Module):
    """Causal MLA with RoPE on a p-dim slice of q and k; the KV cache holds (c, k_rot) per layer."""

    def __init__(self, d_model: int, n_heads: int, cfg: MLAConfig):
        super().__init__()
        self.cfg, self.n_heads = cfg, n_heads
        H, r, n, p, v = n_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(d_model, H * (n + p), bias=False)
            self.q_a_proj = self.q_a_norm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = Linear(d_model, cfg.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.latent_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * (n + p), bias=False)
        self.kv_a_proj = Linear(d_model, r + p, bias=False)
        self.kv_a_norm = RMSNorm(r, cfg.latent_norm_eps)
        self.kv_b_proj = Linear(r, H * (n + v), bias=False)
        self.o_proj = Linear(H * v, d_model, bias=False)

    def forward(
        self,
        x_BSD: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> Tensor:
        cfg, H = self.cfg, self.n_heads
        r, n, p, dv = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        B, S, _ = x_BSD.shape
        # 1. queries, split into the no-RoPE and RoPE parts of each head
        q = (
            self.q_proj(x_BSD)
            if self.q_proj is not None
            else self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BSD)))
        )
        q_BHSk = q.view(B, S, H, n + p).transpose(1, 2)
        q_nope, q_rot = q_BHSk.split([n, p], dim=-1)
        # 2. the latent c and the single RoPE key, which are what the cache keeps
        c_BSr, k_rot_BSp = self.kv_a_proj(x_BSD).split([r, p], dim=-1)
        c_B1Sr = self.kv_a_norm(c_BSr).unsqueeze(1)
        q_rot = apply_rope(q_rot, cos, sin)
        k_rot_B1Sp = apply_rope(k_rot_BSp.unsqueeze(1), cos, sin)
        if cache is not None:
            c_B1Sr, k_rot_B1Sp = cache.update(layer_idx, c_B1Sr, k_rot_B1Sp)  # now (B, 1, L, .)
        L = c_B1Sr.shape[2]
        # 3. expand the latent into per-head keys and values
        kv_BHLk = self.kv_b_proj(c_B1Sr.squeeze(1)).view(B, L, H, n + dv).transpose(1, 2)
        k_nope, v_BHLv = kv_BHLk.split([n, dv], dim=-1)
        k_BHLk = torch.cat([k_nope, k_rot_B1Sp.expand(B, H, L, p)], dim=-1)
        q_BHSk = torch.cat([q_nope, q_rot], dim=-1)
        # 4. attention; value and q/k head dims may differ
        is_causal = mask is None and L == S
        o = F.scaled_dot_product_attention(
            q_BHSk, k_BHLk, v_BHLv, attn_mask=mask, is_causal=is_causal, scale=cfg.scale
        )
        return self.o_proj(o.transpose(1, 2).reshape(B, S, H * dv))
