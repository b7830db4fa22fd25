"""What a count found (``SpecReport``), and the FLOPs and memory that follow from it.

Pure arithmetic, no torch, nothing architecture-specific: ``moekit.spec.count`` fills a report from a
config's fields; the estimates here read only the report.

Legend: H query heads, S context length (the keys a token attends to).

Conventions:
- FLOPs are 2 per weight a token multiplies by (``Component.matmul``; biases and norms excluded), plus
  attention scores 2·H·(qk+v)·S per layer for a token attending to S keys (a sliding window caps S).
- KV-cache bytes are ``AttentionLayer.kv_cache`` elements per token per layer times ``KV_BYTES[dtype]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "BYTES_PER_PARAM", "COMPONENTS", "KV_BYTES", "AttentionLayer", "Component", "SpecReport",
    "flops_per_token", "memory",
]

COMPONENTS = ("embeddings", "attention", "router", "routed_experts", "shared_experts", "dense_mlp",
              "norms", "lm_head")
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}
KV_BYTES = {"bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class Component:
    total: int
    active: int
    matmul: int  # weights one token multiplies by; a tied LM head has matmul but no params of its own


@dataclass(frozen=True)
class AttentionLayer:
    """The part of one attention layer that grows with context: scores and the KV cache."""

    n_heads: int
    qk_dim: int  # per head
    v_dim: int  # per head
    kv_cache: int  # elements cached per token (0 for an encoder layer)
    window: int | None = None


@dataclass(frozen=True)
class SpecReport:
    model_type: str
    components: dict[str, Component]
    attention: tuple[AttentionLayer, ...]
    tied_embeddings: bool
    hidden_size: int
    num_layers: int
    num_moe_layers: int
    num_experts: int
    experts_per_token: int
    notes: tuple[str, ...] = ()

    @property
    def total_params(self) -> int:
        return sum(c.total for c in self.components.values())

    @property
    def active_params(self) -> int:
        return sum(c.active for c in self.components.values())

    @property
    def active_params_no_embedding(self) -> int:
        """Active without the input embedding table; tied, that table is the LM head and stays."""
        emb = 0 if self.tied_embeddings else self.components["embeddings"].active
        return self.active_params - emb


def flops_per_token(report: SpecReport, seq_len: int = 4096) -> dict[str, int]:
    """Forward FLOPs for one token attending to ``seq_len`` keys (the last token of that context)."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    c = report.components
    out = {name: 2 * c[name].matmul for name in ("router", "routed_experts", "shared_experts", "dense_mlp", "lm_head")}
    out["attention_projections"] = 2 * c["attention"].matmul
    out["attention_scores"] = sum(2 * a.n_heads * (a.qk_dim + a.v_dim) * min(seq_len, a.window or seq_len)
                                  for a in report.attention)
    out["moe"] = out["router"] + out["routed_experts"] + out["shared_experts"]
    out["attention"] = out["attention_projections"] + out["attention_scores"]
    out["total"] = out["attention"] + out["moe"] + out["dense_mlp"] + out["lm_head"]
    return out


def memory(report: SpecReport, seq_len: int = 4096) -> dict[str, Any]:
    """Weight bytes per dtype and KV-cache bytes (per token per layer, per token, at ``seq_len``)."""
    per_layer = [a.kv_cache for a in report.attention if a.kv_cache]
    at_len = sum(a.kv_cache * min(seq_len, a.window or seq_len) for a in report.attention)
    return {
        "weights_bytes": {dt: int(report.total_params * b) for dt, b in BYTES_PER_PARAM.items()},
        "kv_cache": {
            "elements_per_token_per_layer": per_layer,
            "bytes_per_token_per_layer": {dt: max(per_layer, default=0) * b for dt, b in KV_BYTES.items()},
            "bytes_per_token": {dt: sum(per_layer) * b for dt, b in KV_BYTES.items()},
            "bytes_at_seq_len": {dt: at_len * b for dt, b in KV_BYTES.items()},
            "sliding_window_layers": sum(1 for a in report.attention if a.window and a.kv_cache),
        },
    }
