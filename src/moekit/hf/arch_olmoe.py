"""OLMoE (``model_type: olmoe``): softmax top-k (renormalised only with ``norm_topk_prob``), every layer
MoE with experts of ``intermediate_size``; RMSNorm over the whole q and k projections (not per head),
optional ``clip_qkv`` and ``attention_bias`` (q/k/v/o).
"""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig, MoEConfig
from moekit.hf.adapter import Adapter
from moekit.hf.fields import Fields, common_hf, export_errors, moe_layers, refuse

__all__ = ["ADAPTER"]

DEFAULTS: dict[str, Any] = {
    "vocab_size": 50304,
    "hidden_size": 2048,
    "intermediate_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": None,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "clip_qkv": None,
    "num_experts_per_tok": 8,
    "num_experts": 64,
    "router_aux_loss_coef": 0.01,
    "norm_topk_prob": False,
}


def to_moekit(hf: dict[str, Any]) -> ModelConfig:
    f = Fields(hf, DEFAULTS, "olmoe")
    base = f.common()
    if base["head_dim"] * base["n_heads"] != base["d_model"]:
        raise f.unsupported(
            "head_dim",
            f"OLMoE's q_norm spans hidden_size={base['d_model']}, so head_dim * "
            "num_attention_heads must equal it",
        )
    moe = MoEConfig(
        d_model=base["d_model"],
        d_hidden=f("intermediate_size"),
        num_experts=f("num_experts"),
        top_k=f("num_experts_per_tok"),
        router="topk",
        norm_topk=bool(f("norm_topk_prob")),
        aux_loss_coef=f("router_aux_loss_coef"),
        z_loss_coef=0.0,
    )
    bias = bool(f("attention_bias"))
    return ModelConfig(
        **base,
        attn_bias=bias,
        attn_out_bias=bias,
        qk_norm=True,
        qk_norm_scope="full",
        clip_qkv=f("clip_qkv"),
        moe=moe,
    )


def from_moekit(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.moe
    errors = export_errors(cfg)
    if cfg.mla is not None:
        errors.append("multi-head latent attention")
    if m.router != "topk":
        errors.append(f"router={m.router!r} (OLMoE routes softmax top-k: router='topk')")
    if m.num_shared_experts:
        errors.append("shared experts (OLMoE has none)")
    if not cfg.qk_norm or cfg.qk_norm_scope != "full":
        errors.append(
            "OLMoE needs q/k RMSNorm over the whole projection (qk_norm=True, qk_norm_scope='full')"
        )
    if cfg.hd * cfg.n_heads != cfg.d_model:
        errors.append(f"head_dim * n_heads = {cfg.hd * cfg.n_heads} != d_model={cfg.d_model}")
    if cfg.attn_bias != cfg.attn_out_bias:
        errors.append("attention_bias covers q/k/v/o together (attn_bias must equal attn_out_bias)")
    if len(moe_layers(cfg)) != cfg.n_layers:
        errors.append("dense layers (every OLMoE layer is MoE)")
    refuse("olmoe", errors)
    hf = common_hf(cfg, "olmoe", "OlmoeForCausalLM")
    hf.update(
        intermediate_size=m.d_hidden,
        num_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        norm_topk_prob=m.norm_topk,
        attention_bias=cfg.attn_bias,
        clip_qkv=cfg.clip_qkv,
        router_aux_loss_coef=m.aux_loss_coef,
        output_router_logits=False,
    )
    return hf


ADAPTER = Adapter(
    model_type="olmoe", architecture="OlmoeForCausalLM", to_moekit=to_moekit, from_moekit=from_moekit
)
