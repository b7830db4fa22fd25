"""Causal grouped-query self-attention with RoPE and an optional KV cache; RMSNorm.

Legend: B batch, S query length, L key length (cache + S), Hq query heads, Hk kv heads, d head dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.nn.linear import Linear

__all__ = ["Attention", "KVCache", "RMSNorm", "apply_rope", "build_attn_mask", "rope_cos_sin", "sink_attention"]


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # aten's rms_norm is the same arithmetic as x * rsqrt(mean(x^2) + eps), in one call
        if x.dtype == torch.float32:  # no casts to dispatch (a decode step runs 2 n_layers + 1 norms)
            return self.weight * F.rms_norm(x, x.shape[-1:], eps=self.eps)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_cos_sin(positions_BS: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Rotary tables (B, S, d) in the 'rotate half' layout (first half pairs with second half)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions_BS.device) / head_dim))
    freqs_BSh = positions_BS.float().unsqueeze(-1) * inv_freq
    emb = torch.cat([freqs_BSh, freqs_BSh], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x_BHSd: Tensor, cos_BSd: Tensor, sin_BSd: Tensor) -> Tensor:
    """Rotate x by the tables: (B, S, d), or (B, 1, S, d) already broadcast over the heads (the model
    passes those, made once per forward instead of once per call)."""
    cos, sin = (cos_BSd, sin_BSd) if cos_BSd.dim() == 4 else (cos_BSd.unsqueeze(1), sin_BSd.unsqueeze(1))
    x1, x2 = x_BHSd.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x_BHSd * cos + rotated * sin


class KVCache:
    """Per-layer key/value tensors (B, Hk, L, d) that grow as decoding goes on.

    ``k[i]`` / ``v[i]`` are always the layer's cached keys and values. A layer without a window writes new
    keys in place into a buffer with room to spare (capacity doubling, at most ``max_len``) and
    ``k[i]`` is a view of its first L positions, so a decode step copies one position instead of the
    whole cache. The buffer is used only while ``k[i]`` is still the view this cache handed out: code
    that puts other tensors in ``k`` / ``v`` (stacking caches, restoring saved ones) gets the
    concatenating path, and a view handed out earlier is never written over.

    ``windows[i]`` (sliding-window layers): layer i keeps only its last ``window - 1`` keys, all the next
    query can see besides itself; ``trimmed[i]`` counts the keys it dropped.
    """

    def __init__(self, n_layers: int, windows: list[int | None] | None = None, max_len: int | None = None):
        self.k: list[Tensor | None] = [None] * n_layers
        self.v: list[Tensor | None] = [None] * n_layers
        self.mask: Tensor | None = None  # (B, L) key padding mask of everything cached so far
        self.windows = list(windows) if windows is not None else [None] * n_layers
        self.trimmed = [0] * n_layers
        self.max_len = max_len
        self._buf: list[tuple[Tensor, Tensor, Tensor, Tensor] | None] = [None] * n_layers  # k, v, their views

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2] + self.trimmed[0]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k``, ``v`` to layer ``layer``'s cache; returns every key and value it attends to."""
        if self.windows[layer] is None:
            return self._append(layer, k, v)
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        w = self.windows[layer]
        if k.shape[2] > w - 1:
            self.trimmed[layer] += k.shape[2] - (w - 1)
            self.k[layer], self.v[layer] = k[:, :, k.shape[2] - (w - 1) :], v[:, :, k.shape[2] - (w - 1) :]
        return k, v

    def _append(self, layer: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        old_k, old_v, buf = self.k[layer], self.v[layer], self._buf[layer]
        L = 0 if old_k is None else old_k.shape[2]
        n = L + k_new.shape[2]
        # k[layer] still the view handed out last time (an identity check: inference tensors keep no _base)
        owned = buf is not None and old_k is buf[2] and old_v is buf[3]
        fits = owned and buf[0].shape[2] >= n and buf[0].shape[:2] == k_new.shape[:2]
        if not fits:
            cap = max(n, 2 * L, 16)  # doubling: a token's append is amortised O(1)
            if self.max_len is not None:
                cap = max(n, min(cap, self.max_len))
            kb, vb = (t.new_empty(t.shape[0], t.shape[1], cap, t.shape[3]) for t in (k_new, v_new))
            if old_k is not None:
                kb[:, :, :L].copy_(old_k)
                vb[:, :, :L].copy_(old_v)
            buf = (kb, vb)
        buf[0][:, :, L:n].copy_(k_new)
        buf[1][:, :, L:n].copy_(v_new)
        k, v = buf[0][:, :, :n], buf[1][:, :, :n]
        self.k[layer], self.v[layer], self._buf[layer] = k, v, (buf[0], buf[1], k, v)
        return k, v


def build_attn_mask(key_mask_BL: Tensor | None, S: int, L: int, device, window: int | None = None
                    ) -> Tensor | None:
    """Boolean (B, 1, S, L) mask: causal over the last S of L keys, minus padded keys; with ``window``,
    also minus keys ``window`` or more places before the query. None when plain causal attention will do.

    Every query may always see itself, so a fully padded row never turns into NaN.
    """
    if key_mask_BL is None and (S == L or S == 1) and (window is None or window >= L):
        return None  # plain causal attention; one query at the end sees every key
    q_pos = torch.arange(L - S, L, device=device).unsqueeze(1)
    k_pos = torch.arange(L, device=device).unsqueeze(0)
    causal_SL = k_pos <= q_pos
    if window is not None:
        causal_SL = causal_SL & (q_pos - k_pos < window)
    if key_mask_BL is None:
        return causal_SL
    allowed = causal_SL.unsqueeze(0) & key_mask_BL.bool().unsqueeze(1)
    allowed = allowed | (k_pos == q_pos).unsqueeze(0)
    return allowed.unsqueeze(1)


def sink_attention(q_BHSd: Tensor, k_BKLd: Tensor, v_BKLd: Tensor, mask: Tensor | None, sinks_H: Tensor,
                   scale: float | None = None) -> Tensor:
    """softmax([q k^T * scale, sink_h]) over the L keys and one sink per head, the sink's share dropped
    before the values are summed: (B, H, S, d); scale None = d ** -0.5. ``mask``: boolean, broadcastable to
    (B, H, S, L); None = causal over the last S keys. K kv heads are repeated to H."""
    B, H, S, d = q_BHSd.shape
    L = k_BKLd.shape[2]
    k, v = (t.repeat_interleave(H // t.shape[1], dim=1) for t in (k_BKLd, v_BKLd))
    scores_BHSL = (q_BHSd @ k.transpose(-1, -2)) * (d**-0.5 if scale is None else scale)
    if mask is None:
        q_pos = torch.arange(L - S, L, device=q_BHSd.device).unsqueeze(1)
        mask = torch.arange(L, device=q_BHSd.device).unsqueeze(0) <= q_pos
    scores_BHSL = scores_BHSL.masked_fill(~mask, float("-inf"))
    sink_BHS1 = sinks_H.to(scores_BHSL.dtype).view(1, H, 1, 1).expand(B, H, S, 1)
    probs = torch.cat([scores_BHSL, sink_BHS1], dim=-1).softmax(dim=-1)[..., :L]
    return probs.to(v.dtype) @ v


class Attention(nn.Module):
    """Causal GQA with RoPE (scaled_dot_product_attention); optional q/k RMSNorm.

    ``qk_norm_scope``: "head" normalises each head (Qwen3), "full" the whole q and k projections
    (OLMoE). ``clip_qkv`` clamps q, k, v (after the norms) to [-clip, clip] (OLMoE). ``out_bias``
    gives o_proj a bias. ``scale``: the softmax scale (None = head_dim ** -0.5). ``sinks``: a learned logit per head (``self.sinks``, (Hq,)) joins every
    softmax and takes probability mass without adding a value (gpt-oss). The sliding window, if any, is
    in the mask the caller passes; a window-trimmed cache returns fewer keys, the mask's last columns.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, bias: bool = False,
                 qk_norm: bool = False, norm_eps: float = 1e-6, out_bias: bool = False,
                 qk_norm_scope: str = "head", clip_qkv: float | None = None, sinks: bool = False,
                 scale: float | None = None):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        if qk_norm_scope not in ("head", "full"):
            raise ValueError(f"qk_norm_scope={qk_norm_scope!r} is unknown; choose 'head' or 'full'")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.clip_qkv, self.scale = clip_qkv, scale
        self.qk_norm_scope = qk_norm_scope
        self.q_proj = Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.v_proj = Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.o_proj = Linear(n_heads * head_dim, d_model, bias=out_bias)
        full = qk_norm_scope == "full"
        self.q_norm = RMSNorm(n_heads * head_dim if full else head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(n_kv_heads * head_dim if full else head_dim, norm_eps) if qk_norm else None
        self.sinks = nn.Parameter(torch.zeros(n_heads)) if sinks else None

    def forward(self, x_BSD: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None = None, layer_idx: int = 0) -> Tensor:
        B, S, _ = x_BSD.shape
        q, k, v = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
        if self.q_norm is not None and self.qk_norm_scope == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.head_dim)
        k = k.view(B, S, self.n_kv_heads, self.head_dim)
        v = v.view(B, S, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.qk_norm_scope == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        if mask is not None and mask.shape[-1] != k.shape[2]:
            mask = mask[..., -k.shape[2]:]  # the cache kept only the window's keys
        o = self.attend(q, k, v, mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Attention (B, H, S, d) of queries q over keys and values (B, Hk, L, d); ``mask`` boolean
        (broadcastable to (B, H, S, L)), None = causal over the last S keys."""
        if self.sinks is not None:
            return sink_attention(q, k, v, mask, self.sinks, self.scale)
        is_causal = mask is None and k.shape[2] == q.shape[2]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale,
                                              enable_gqa=self.n_heads != self.n_kv_heads)
