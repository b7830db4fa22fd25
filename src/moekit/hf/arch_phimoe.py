"""PhiMoE (``model_type: phimoe``; Phi-3.5-MoE): SparseMixer routing, LayerNorms with biases.

Routing (``sparsemixer``): two picks per token, each weighted by a softmax over the experts whose logit is
within a relative ``2 * router_jitter_noise`` of its own -- moekit's ``sparsemixer`` router (its inference
path; moekit trains it with plain autograd, not Phi's gradient estimator). ``input_jitter_noise`` is
multiplicative noise on the router input in training -- moekit's ``router_jitter``. Norms: LayerNorm with
weight and bias (eps ``rms_norm_eps``); optional biases on q/k/v/o (``attention_bias``) and on the head
(``lm_head_bias``); a sliding window, when set, in every layer. Experts: Mixtral's names
(``block_sparse_moe.experts.{e}.w1/w3/w2``, router ``block_sparse_moe.gate``). Phi-3.5-MoE's published
longrope scaling is moekit.nn.rope's (see moekit.hf.rope_fields for where transformers differs).
"""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig, MoEConfig
from moekit.hf.adapter import Adapter, ExpertNames
from moekit.hf.fields import Fields, common_hf, export_errors, moe_layers, refuse

__all__ = ["ADAPTER"]

# PhimoeConfig defaults (transformers 5), used for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32064,
    "hidden_size": 4096,
    "intermediate_size": 6400,
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
    "num_local_experts": 16,
    "router_aux_loss_coef": 0.001,
    "router_jitter_noise": 0.01,
    "input_jitter_noise": 0.0,
    "attention_bias": False,
    "lm_head_bias": False,
}


def to_moekit(hf: dict[str, Any]) -> ModelConfig:
    f = Fields(hf, DEFAULTS, "phimoe")
    base = f.common()
    base["head_dim"] = None  # PhimoeAttention: hidden_size // num_attention_heads
    if f("num_experts_per_tok") != 2:
        raise f.unsupported("num_experts_per_tok", "SparseMixer routing picks two experts")
    bias = bool(f("attention_bias"))
    moe = MoEConfig(
        d_model=base["d_model"],
        d_hidden=f("intermediate_size"),
        num_experts=f("num_local_experts"),
        top_k=2,
        router="sparsemixer",
        sparsemixer_eps=float(f("router_jitter_noise")),
        router_jitter=float(f("input_jitter_noise") or 0.0),
        aux_loss_coef=float(f("router_aux_loss_coef")),
        z_loss_coef=0.0,
    )
    return ModelConfig(
        **base,
        moe=moe,
        attn_bias=bias,
        attn_out_bias=bias,
        norm_type="layer_bias",
        lm_head_bias=bool(f("lm_head_bias")),
        sliding_window=f("sliding_window"),
    )


def from_moekit(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.moe
    errors = export_errors(cfg, windows=True, layer_norm=True, head_bias=True)
    if cfg.mla is not None or cfg.norm_type != "layer_bias":
        errors.append("PhiMoE has GQA and LayerNorms with biases (norm_type='layer_bias')")
    if m.router != "sparsemixer" or m.num_shared_experts:
        errors.append("PhiMoE routes with SparseMixer (router='sparsemixer'), no shared experts")
    if cfg.attn_bias != cfg.attn_out_bias or cfg.qk_norm or cfg.clip_qkv is not None:
        errors.append("PhiMoE attention has biases on all of q/k/v/o or none, no q-k norm or clip")
    if cfg.head_dim not in (None, cfg.d_model // cfg.n_heads):
        errors.append(f"head_dim={cfg.head_dim} (PhiMoE's is hidden_size // num_attention_heads)")
    if cfg.sliding_layers is not None and len(cfg.sliding_layers) != cfg.n_layers:
        errors.append(f"sliding_layers={cfg.sliding_layers} (PhiMoE slides in every layer or none)")
    if len(moe_layers(cfg)) != cfg.n_layers:
        errors.append("dense layers (every PhiMoE layer is MoE)")
    refuse("phimoe", errors)
    hf = common_hf(cfg, "phimoe", "PhimoeForCausalLM")
    hf.pop("head_dim")
    hf.update(
        intermediate_size=m.d_hidden,
        num_local_experts=m.num_experts,
        num_experts_per_tok=2,
        router_jitter_noise=m.sparsemixer_eps,
        input_jitter_noise=m.router_jitter,
        attention_bias=cfg.attn_bias,
        lm_head_bias=cfg.lm_head_bias,
        sliding_window=cfg.sliding_window,
        router_aux_loss_coef=m.aux_loss_coef,
        output_router_logits=False,
    )
    return hf


ADAPTER = Adapter(
    model_type="phimoe",
    architecture="PhimoeForCausalLM",
    to_moekit=to_moekit,
    from_moekit=from_moekit,
    experts=ExpertNames(prefix="block_sparse_moe.", gate="w1", up="w3", down="w2", alt_prefixes=("mlp.",)),
)
