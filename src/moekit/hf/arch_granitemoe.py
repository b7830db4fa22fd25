"""GraniteMoE (``model_type: granitemoe``; IBM Granite 3.0 / 3.1 MoE): Mixtral-style MoE with multipliers.

Routing (``GraniteMoeTopKRouter``): the top-k logits, softmaxed over the picks -- moekit's ``topk``
router renormalised. Every layer is MoE, no shared experts. Granite's four scalars: the embeddings are
multiplied by ``embedding_multiplier``, each sub-layer's output by ``residual_multiplier`` before the
residual sum, the attention softmax scale is ``attention_multiplier`` (not head_dim ** -0.5), and the
logits are divided by ``logits_scaling``. Checkpoints store each layer's experts fused:
``block_sparse_moe.input_linear.weight`` (E, 2H, D), gate rows first, and ``output_linear.weight``
(E, D, H); the router is ``block_sparse_moe.router.layer.weight``.
"""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig, MoEConfig
from moekit.hf.adapter import Adapter, ExpertNames
from moekit.hf.fields import Fields, common_hf, export_errors, moe_layers, refuse
from moekit.hf.fused_experts import fused_expert_io

__all__ = ["ADAPTER"]

# GraniteMoeConfig defaults (transformers 5), used for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "embedding_multiplier": 1.0,
    "logits_scaling": 1.0,
    "residual_multiplier": 1.0,
    "attention_multiplier": 1.0,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "router_aux_loss_coef": 0.001,
}
MOE = "block_sparse_moe."


def to_moekit(hf: dict[str, Any]) -> ModelConfig:
    f = Fields(hf, DEFAULTS, "granitemoe")
    base = f.common()
    base["head_dim"] = None  # GraniteMoeAttention: hidden_size // num_attention_heads, always
    bias = bool(f("attention_bias"))
    moe = MoEConfig(
        d_model=base["d_model"],
        d_hidden=f("intermediate_size"),
        num_experts=f("num_local_experts"),
        top_k=f("num_experts_per_tok"),
        router="topk",
        norm_topk=True,
        aux_loss_coef=float(f("router_aux_loss_coef") or 0.0),
        z_loss_coef=0.0,
    )
    return ModelConfig(
        **base,
        moe=moe,
        attn_bias=bias,
        attn_out_bias=bias,
        embed_scale=float(f("embedding_multiplier")),
        residual_scale=float(f("residual_multiplier")),
        attn_scale=float(f("attention_multiplier")),
        logits_divisor=float(f("logits_scaling")),
    )


def from_moekit(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.moe
    errors = export_errors(cfg, multipliers=True)
    if cfg.mla is not None:
        errors.append("multi-head latent attention")
    if m.router != "topk" or not m.norm_topk or m.num_shared_experts:
        errors.append("GraniteMoE routes softmax over the top-k logits (router='topk', norm_topk), no shared experts")
    if cfg.attn_bias != cfg.attn_out_bias or cfg.qk_norm or cfg.clip_qkv is not None:
        errors.append("GraniteMoE attention has biases on all of q/k/v/o or none, no q-k norm or clip")
    if cfg.head_dim not in (None, cfg.d_model // cfg.n_heads):
        errors.append(f"head_dim={cfg.head_dim} (GraniteMoE's is hidden_size // num_attention_heads)")
    if len(moe_layers(cfg)) != cfg.n_layers:
        errors.append("dense layers (every GraniteMoE layer is MoE)")
    refuse("granitemoe", errors)
    hf = common_hf(cfg, "granitemoe", "GraniteMoeForCausalLM")
    hf.pop("head_dim")
    hf.update(
        intermediate_size=m.d_hidden,
        num_local_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        attention_bias=cfg.attn_bias,
        embedding_multiplier=cfg.embed_scale,
        residual_multiplier=cfg.residual_scale,
        attention_multiplier=cfg.attn_scale if cfg.attn_scale is not None else cfg.hd**-0.5,
        logits_scaling=cfg.logits_divisor,
        router_aux_loss_coef=m.aux_loss_coef,
        output_router_logits=False,
    )
    return hf


ADAPTER = Adapter(
    model_type="granitemoe",
    architecture="GraniteMoeForCausalLM",
    to_moekit=to_moekit,
    from_moekit=from_moekit,
    renames=(("ffn.router.weight", MOE + "router.layer.weight"),),
    experts=ExpertNames(prefix=MOE),
    fused=(fused_expert_io(MOE + "input_linear.weight", MOE + "output_linear.weight"),),
)
