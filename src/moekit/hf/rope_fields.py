"""RoPE settings of an HF config.json (``rope_parameters``, or the older ``rope_scaling``) both ways.

LongRoPE (Phi) switches to its long factors once the context outgrows the original one, as Phi's own
code does; transformers 5's PhiMoE keeps the short factors at every length (only the mscale switches),
so past the original context the two differ.

transformers reads the scaling types moekit implements (moekit.nn.rope) with these defaults: yarn's
``factor`` = max_position_embeddings / original_max_position_embeddings when absent, ``beta_fast`` 32,
``beta_slow`` 1, ``truncate`` true; yarn and llama3's original context = max_position_embeddings when
absent; ``dynamic`` grows the base past ``max_position_embeddings`` itself (moekit then accepts
sequences up to factor times it).
"""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig
from moekit.config.rope import ROPE_TYPES, RopeScaling

__all__ = ["rope_from_hf", "rope_to_hf"]


def _params(hf: dict[str, Any], model_type: str) -> tuple[str, dict[str, Any]]:
    """(the key the RoPE settings are under, the settings); per-layer-type settings must agree."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = hf.get(key) or {}
    if "full_attention" in rope or "sliding_attention" in rope:
        kinds = {k: v for k, v in rope.items() if k in ("full_attention", "sliding_attention") and v}
        first = next(iter(kinds.values()))
        if any(v != first for v in kinds.values()):
            raise ValueError(
                f"{model_type}: {key} differs between layer types {sorted(kinds)}; moekit uses one RoPE"
            )
        rope = first
    return key, rope


def rope_from_hf(hf: dict[str, Any], model_type: str, theta: float, max_pos: int) -> tuple[float, RopeScaling | None, int]:
    """(rope_theta, RopeScaling or None, the longest sequence moekit accepts) of an HF config."""
    key, rope = _params(hf, model_type)
    theta = float(rope.get("rope_theta", theta))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None, max_pos
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"{model_type}: {key} rope_type={rope_type!r} is not supported by moekit "
            f"(supported: 'default', {', '.join(map(repr, ROPE_TYPES))})"
        )
    original = rope.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings") or max_pos
    if rope_type == "dynamic":
        original = max_pos  # transformers' dynamic NTK grows past max_position_embeddings, whatever else is set
    factor = rope.get("factor")
    if factor is None and rope_type in ("yarn", "longrope"):
        factor = max_pos / original
    if factor is None:
        raise ValueError(f"{model_type}: {key} rope_type={rope_type!r} has no 'factor'")
    optional = {k: rope[k] for k in ("attention_factor", "mscale", "mscale_all_dim", "short_mscale", "long_mscale",
                                     "short_factor", "long_factor") if rope.get(k) is not None}
    scaling = RopeScaling(
        rope_type=rope_type,
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(rope.get("beta_fast") or 32.0),
        beta_slow=float(rope.get("beta_slow") or 1.0),
        truncate=bool(rope.get("truncate", True)),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        **{k: v if isinstance(v, list) else float(v) for k, v in optional.items()},
    )
    longest = max(max_pos, int(max_pos * factor)) if rope_type == "dynamic" else max_pos
    return theta, scaling, longest


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """``rope_theta``, ``rope_parameters`` and ``max_position_embeddings`` that say cfg's RoPE to transformers."""
    r = cfg.rope_scaling
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    max_pos = cfg.max_seq_len
    if r is not None:
        params["rope_type"] = r.rope_type
        params["factor"] = r.factor
        if r.rope_type == "dynamic":
            max_pos = r.original_max_position_embeddings
        else:
            params["original_max_position_embeddings"] = r.original_max_position_embeddings
        if r.rope_type == "yarn":
            params.update(beta_fast=r.beta_fast, beta_slow=r.beta_slow, truncate=r.truncate)
            params.update({k: getattr(r, k) for k in ("attention_factor", "mscale", "mscale_all_dim")
                           if getattr(r, k) is not None})
        if r.rope_type == "longrope":
            params.update(short_factor=list(r.short_factor), long_factor=list(r.long_factor))
            params.update({k: getattr(r, k) for k in ("attention_factor", "short_mscale", "long_mscale")
                           if getattr(r, k) is not None})
        if r.rope_type == "llama3":
            params.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor)
    return {"rope_theta": cfg.rope_theta, "rope_parameters": params, "max_position_embeddings": max_pos}
