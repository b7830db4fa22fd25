"""RoPE tables with frequency scaling (linear, dynamic NTK, YaRN, Llama 3), as transformers computes them.

Legend: B batch, S sequence, d rotated dims, h = d / 2 frequencies.

Without scaling the tables are moekit.nn.attention.rope_cos_sin's, unchanged. With it, the h inverse
frequencies are rescaled (and, for YaRN, cos and sin are multiplied by an attention factor); the layout
stays "rotate half". The frequencies are computed in fp32 from the same formulas as transformers'
``modeling_rope_utils``, so the logits of a scaled checkpoint match to fp32 rounding.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit.config import ModelConfig
from moekit.config.rope import RopeScaling
from moekit.nn.attention import rope_cos_sin

__all__ = ["rope_inv_freq", "rope_tables", "yarn_mscale"]


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _base_inv_freq_h(dim: int, theta: float | Tensor, device) -> Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def _yarn(dim: int, theta: float, r: RopeScaling, device) -> tuple[Tensor, float]:
    """Frequencies with fewer than beta_slow rotations over the original context are interpolated
    (/ factor), those with more than beta_fast kept, a linear ramp between."""
    factor = r.factor
    attention = r.attention_factor
    if attention is None:
        attention = (
            yarn_mscale(factor, r.mscale) / yarn_mscale(factor, r.mscale_all_dim)
            if r.mscale and r.mscale_all_dim
            else yarn_mscale(factor)
        )

    def correction_dim(rotations: float) -> float:
        return dim * math.log(r.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(r.beta_fast or 32), correction_dim(r.beta_slow or 1)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp_h = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    pos_freqs_h = theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
    keep_h = 1 - ramp_h  # 1 = extrapolate (keep the frequency), 0 = interpolate
    inv_freq_h = (1.0 / (factor * pos_freqs_h)) * (1 - keep_h) + (1.0 / pos_freqs_h) * keep_h
    return inv_freq_h, float(attention)


def _llama3(dim: int, theta: float, r: RopeScaling, device) -> Tensor:
    inv_freq_h = _base_inv_freq_h(dim, theta, device)
    old = r.original_max_position_embeddings
    low_wavelen, high_wavelen = old / r.low_freq_factor, old / r.high_freq_factor
    wavelen_h = 2 * math.pi / inv_freq_h
    scaled_h = torch.where(wavelen_h > low_wavelen, inv_freq_h / r.factor, inv_freq_h)
    smooth_h = (old / wavelen_h - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    smoothed_h = (1 - smooth_h) * scaled_h / r.factor + smooth_h * scaled_h
    medium_h = ~(wavelen_h < high_wavelen) * ~(wavelen_h > low_wavelen)
    return torch.where(medium_h, smoothed_h, scaled_h)


def _longrope(dim: int, theta: float, r: RopeScaling, seq_len: int, device) -> tuple[Tensor, float]:
    """Phi's LongRoPE: per-frequency divisors, the long ones once the context outgrows the original."""
    long = seq_len > r.original_max_position_embeddings
    ext = r.long_factor if long else r.short_factor
    if len(ext) != dim // 2:
        raise ValueError(f"rope_scaling longrope has {len(ext)} factors; the rotated dim {dim} needs {dim // 2}")
    mscale = r.long_mscale if long else r.short_mscale
    if mscale is None:
        mscale = r.attention_factor
    if mscale is None:
        n = r.original_max_position_embeddings
        mscale = 1.0 if r.factor <= 1 else math.sqrt(1 + math.log(r.factor) / math.log(n))
    shape_h = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (torch.tensor(ext, dtype=torch.float32, device=device) * theta**shape_h), float(mscale)


def rope_inv_freq(dim: int, theta: float, r: RopeScaling, seq_len: int, device=None) -> tuple[Tensor, float]:
    """(inverse frequencies (h,), cos/sin multiplier) of scaling ``r`` for a ``seq_len``-long context."""
    if r.rope_type == "longrope":
        return _longrope(dim, theta, r, seq_len, device)
    if r.rope_type == "linear":
        return _base_inv_freq_h(dim, theta, device) / r.factor, 1.0
    if r.rope_type == "dynamic":
        # the base grows once the context outgrows the original one (in fp32, as transformers does)
        n = r.original_max_position_embeddings
        length = torch.tensor(max(seq_len, n), dtype=torch.float32)
        base = theta * ((r.factor * length / n) - (r.factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq_h(dim, base.to(device), device), 1.0
    if r.rope_type == "yarn":
        return _yarn(dim, theta, r, device)
    return _llama3(dim, theta, r, device), 1.0


def rope_tables(positions_BS: Tensor, cfg: ModelConfig, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin (B, S, d) for the positions: plain RoPE's tables, or the scaled ones of ``cfg.rope_scaling``."""
    r = cfg.rope_scaling
    if r is None:
        return rope_cos_sin(positions_BS, cfg.rope_dim, cfg.rope_theta, dtype)
    # only dynamic and longrope depend on the context length (read on the host: one sync per forward)
    needs_len = r.rope_type in ("dynamic", "longrope") and positions_BS.numel()
    seq_len = int(positions_BS.max()) + 1 if needs_len else 0
    inv_freq_h, attention = rope_inv_freq(cfg.rope_dim, cfg.rope_theta, r, seq_len, positions_BS.device)
    freqs_BSh = positions_BS.float().unsqueeze(-1) * inv_freq_h
    emb = torch.cat([freqs_BSh, freqs_BSh], dim=-1)
    return (emb.cos() * attention).to(dtype), (emb.sin() * attention).to(dtype)
