"""Mixtral (``model_type: mixtral``): softmax top-k renormalised, no shared experts, every layer MoE.

Hub checkpoints: ``model.layers.{i}.block_sparse_moe.gate.weight`` and
``block_sparse_moe.experts.{e}.w1/w3/w2.weight`` (gate/up/down); transformers >= 5 keeps
``mlp.gate.weight`` and fused ``mlp.experts.gate_up_proj``/``down_proj`` in memory (also accepted).
"""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig, MoEConfig
from moekit.hf.adapter import Adapter, ExpertNames
from moekit.hf.fields import Fields, common_hf, export_errors, moe_layers, refuse

__all__ = ["ADAPTER"]

# MixtralConfig defaults (transformers 5), used for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "rope_theta": 1e6,
    "sliding_window": None,
    "num_experts_per_tok": 2,
    "num_local_experts": 8,
    "router_aux_loss_coef": 0.001,
    "router_jitter_noise": 0.0,
}


def to_moekit(hf: dict[str, Any]) -> ModelConfig:
    f = Fields(hf, DEFAULTS, "mixtral")
    base = f.common()
    moe = MoEConfig(
        d_model=base["d_model"],
        d_hidden=f("intermediate_size"),
        num_experts=f("num_local_experts"),
        top_k=f("num_experts_per_tok"),
        router="topk",
        norm_topk=True,
        aux_loss_coef=f("router_aux_loss_coef"),
        z_loss_coef=0.0,
        router_jitter=f("router_jitter_noise") or 0.0,
    )
    return ModelConfig(**base, moe=moe, sliding_window=f("sliding_window"))  # every layer slides


def from_moekit(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.moe
    errors = export_errors(cfg, windows=True)
    if cfg.mla is not None:
        errors.append("multi-head latent attention")
    if m.router != "topk" or not m.norm_topk:
        errors.append(
            f"router={m.router!r} norm_topk={m.norm_topk} (Mixtral routes softmax top-k renormalised: "
            "router='topk', norm_topk=True)"
        )
    if m.num_shared_experts:
        errors.append(f"num_shared_experts={m.num_shared_experts} (Mixtral has none)")
    if cfg.attn_bias or cfg.attn_out_bias or cfg.qk_norm or cfg.clip_qkv is not None:
        errors.append("attention biases / q-k norms / clip_qkv (Mixtral has none)")
    if len(moe_layers(cfg)) != cfg.n_layers:
        errors.append("dense layers (every Mixtral layer is MoE)")
    if cfg.sliding_layers is not None and len(cfg.sliding_layers) != cfg.n_layers:
        errors.append(f"sliding_layers={cfg.sliding_layers} (Mixtral slides in every layer or none)")
    refuse("mixtral", errors)
    hf = common_hf(cfg, "mixtral", "MixtralForCausalLM")
    hf.update(
        intermediate_size=m.d_hidden,
        num_local_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        sliding_window=cfg.sliding_window,
        router_aux_loss_coef=m.aux_loss_coef,
        router_jitter_noise=m.router_jitter,
        output_router_logits=False,
    )
    return hf


ADAPTER = Adapter(
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    to_moekit=to_moekit,
    from_moekit=from_moekit,
    experts=ExpertNames(prefix="block_sparse_moe.", gate="w1", up="w3", down="w2", alt_prefixes=("mlp.",)),
)
