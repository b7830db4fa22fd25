"""HF config.json translation helpers shared by the architecture adapters (moekit.hf.arch_*), and the
RoPE row permutation between the interleaved layout some checkpoints use and moekit's rotate-half.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moekit.config import ModelConfig
from moekit.hf.rope_fields import rope_from_hf, rope_to_hf

__all__ = [
    "ALIASES",
    "Fields",
    "common_hf",
    "export_errors",
    "half_to_interleave",
    "interleave_to_half",
    "moe_layers",
    "refuse",
]


# transformers' attribute_map aliases: a config.json may use either name (e.g. Qwen3's saved configs
# say num_local_experts, the hub's say num_experts)
ALIASES = {"num_experts": "num_local_experts", "num_local_experts": "num_experts"}


class Fields:
    """Read an HF config dict with the architecture's defaults for absent keys; errors name the field."""

    def __init__(self, hf: dict[str, Any], defaults: dict[str, Any], model_type: str):
        self.hf, self.defaults, self.model_type = hf, defaults, model_type

    def __call__(self, key: str) -> Any:
        if key in self.hf:
            return self.hf[key]
        if ALIASES.get(key) in self.hf:
            return self.hf[ALIASES[key]]
        if key in self.defaults:
            return self.defaults[key]
        raise ValueError(f"{self.model_type} config.json has no {key!r}")

    def unsupported(self, key: str, why: str) -> ValueError:
        return ValueError(f"{self.model_type}: {key}={self(key)!r} is not supported by moekit ({why})")

    def common(self, quant_methods: tuple[str, ...] = ()) -> dict[str, Any]:
        """ModelConfig fields every architecture shares; rejects what no adapter implements.

        ``quant_methods``: the ``quantization_config.quant_method`` values the adapter reads itself."""
        f = self
        quant = f.hf.get("quantization_config")
        if quant and (not isinstance(quant, dict) or quant.get("quant_method") not in quant_methods):
            raise ValueError(
                f"{f.model_type}: quantization_config={quant!r} is not supported by moekit "
                "(dequantize the checkpoint first)"
            )
        if f("hidden_act") != "silu":
            raise f.unsupported("hidden_act", "moekit's experts and MLPs are SwiGLU, i.e. silu only")
        max_pos = f("max_position_embeddings")
        theta, scaling, longest = rope_from_hf(f.hf, f.model_type, f("rope_theta"), max_pos)
        rope = f.hf.get("rope_parameters") or f.hf.get("rope_scaling") or {}
        rope = rope.get("full_attention", rope)
        if rope.get("partial_rotary_factor", f.hf.get("partial_rotary_factor", 1.0)) not in (None, 1, 1.0):
            raise ValueError(
                f"{f.model_type}: partial_rotary_factor="
                f"{rope.get('partial_rotary_factor', f.hf.get('partial_rotary_factor'))!r} is not "
                "supported by moekit (RoPE over the whole head only)"
            )
        heads = f("num_attention_heads")
        return {
            "vocab_size": f("vocab_size"),
            "d_model": f("hidden_size"),
            "n_layers": f("num_hidden_layers"),
            "n_heads": heads,
            "n_kv_heads": f("num_key_value_heads") or heads,
            "head_dim": f.hf.get("head_dim") or f("hidden_size") // heads,
            "max_seq_len": longest,
            "rope_theta": theta,
            "rope_scaling": scaling,
            "norm_eps": float(f("rms_norm_eps")),
            "tie_embeddings": bool(f("tie_word_embeddings")),
            "init_std": float(f("initializer_range")),
        }


def common_hf(cfg: ModelConfig, model_type: str, architecture: str) -> dict[str, Any]:
    """HF config fields every architecture shares (the inverse of :meth:`Fields.common`)."""
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.hd,
        **rope_to_hf(cfg),  # rope_theta, rope_parameters, max_position_embeddings
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "hidden_act": "silu",
        "use_cache": True,
        "attention_dropout": 0.0,
    }


def export_errors(cfg: ModelConfig, *, windows: bool = False, sinks: bool = False,
                  multipliers: bool = False, layer_norm: bool = False, head_bias: bool = False,
                  moa: bool = False) -> list[str]:
    """What no HF MoE architecture here can express, whatever the adapter; sliding windows, attention
    sinks (with gpt-oss's biases and clamp), Granite's multipliers, LayerNorms, a head bias and JetMoE's mixture of
    attention unless the adapter writes them."""
    m = cfg.moe
    errors = []
    if cfg.norm_type != "rms" and not layer_norm:
        errors.append(f"norm_type={cfg.norm_type!r}")
    if cfg.lm_head_bias and not head_bias:
        errors.append("lm_head_bias=True")
    if (cfg.attn_experts or m.output_bias) and not moa:
        errors.append("a mixture of attention heads / an MoE output bias (JetMoE's)")
    scales = (cfg.embed_scale, cfg.residual_scale, cfg.logits_divisor, cfg.attn_scale)
    if not multipliers and scales != (1.0, 1.0, 1.0, None):
        errors.append("embed_scale / residual_scale / logits_divisor / attn_scale (Granite's multipliers)")
    if cfg.sliding_window is not None and not windows:
        errors.append(f"sliding_window={cfg.sliding_window}")
    if cfg.attn_sinks and not sinks:
        errors.append("attention sinks")
    if not sinks and (m.router_bias or m.expert_ffn_bias or m.swiglu_limit is not None):
        errors.append("router / expert biases or a clamped SwiGLU (gpt-oss's)")
    if cfg.dense:
        errors.append("dense=True (no MoE layer)")
    if m.activation != "swiglu":
        errors.append(f"moe.activation={m.activation!r} (HF MoE experts are SwiGLU)")
    if m.num_extra_experts:
        errors.append(f"{m.num_extra_experts} null / zero-computation experts (no HF MoE architecture has them)")
    if m.capacity_factor is not None:
        errors.append(
            f"moe.capacity_factor={m.capacity_factor} drops tokens; HF MoE is dropless "
            "(set it to null in config.json to export the dropless model)"
        )
    return errors


def refuse(model_type: str, errors: list[str]) -> None:
    if errors:
        raise ValueError(f"this model cannot be written as {model_type}: " + "; ".join(errors))


def moe_layers(cfg: ModelConfig) -> list[int]:
    return [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]


# ------------------------------------------------------------------------------------ RoPE layouts
def _permute_rows(w: Tensor, heads: int, head: int, offset: int, rot: int, to_half: bool) -> Tensor:
    """Within each of ``heads`` row blocks of size ``head``, reorder rows [offset, offset + rot):
    interleaved pairs (0, 1), (2, 3), ... -> halves (0, 2, ... | 1, 3, ...) or back."""
    rest = w.shape[1:]
    w = w.reshape(heads, head, *rest)
    r = w[:, offset : offset + rot]
    r = (r.reshape(heads, rot // 2, 2, *rest) if to_half else r.reshape(heads, 2, rot // 2, *rest)).transpose(
        1, 2
    )
    w = torch.cat([w[:, :offset], r.reshape(heads, rot, *rest), w[:, offset + rot :]], dim=1)
    return w.reshape(heads * head, *rest)


def interleave_to_half(w: Tensor, heads: int, head: int, offset: int = 0, rot: int | None = None) -> Tensor:
    return _permute_rows(w, heads, head, offset, head if rot is None else rot, True)


def half_to_interleave(w: Tensor, heads: int, head: int, offset: int = 0, rot: int | None = None) -> Tensor:
    return _permute_rows(w, heads, head, offset, head if rot is None else rot, False)
