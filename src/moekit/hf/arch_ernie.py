"""ERNIE 4.5 MoE (``model_type: ernie4_5_moe``).

Routing: p = softmax(l) in fp32; experts chosen by top-k of p + e_score_correction_bias; weights = the
chosen p divided by max(sum, moe_norm_min) -- moekit's ``sigmoid_bias`` router with
``score_func="softmax"``, no groups, no scaling. Shared experts: one SwiGLU MLP of
``moe_intermediate_size * moe_num_shared_experts``, ungated. Layer i is MoE when
``(i + 1) % moe_layer_interval == 0`` and ``moe_layer_start_index <= i <= moe_layer_end_index``.
RoPE is applied to interleaved pairs (GLM style), so q_proj/k_proj rows are permuted into moekit's
rotate-half layout on load and back on save (q.k products are unchanged).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from moekit.config import ModelConfig, MoEConfig
from moekit.hf.adapter import Adapter
from moekit.hf.fields import (
    Fields,
    common_hf,
    export_errors,
    half_to_interleave,
    interleave_to_half,
    moe_layers,
    refuse,
)

__all__ = ["ADAPTER"]

DEFAULTS: dict[str, Any] = {
    "vocab_size": 103424,
    "hidden_size": 2560,
    "intermediate_size": 12288,
    "num_hidden_layers": 28,
    "num_attention_heads": 20,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "rope_theta": 500000.0,
    "use_bias": False,
    "moe_intermediate_size": 1536,
    "moe_k": 6,
    "moe_num_experts": 64,
    "moe_num_shared_experts": 2,
    "moe_layer_start_index": 1,
    "moe_layer_end_index": -1,
    "moe_layer_interval": 1,
    "moe_norm_min": 1e-12,
    "router_aux_loss_coef": 0.001,
}


def to_moekit(hf: dict[str, Any]) -> ModelConfig:
    f = Fields(hf, DEFAULTS, "ernie4_5_moe")
    base = f.common()
    if f("use_bias"):
        raise f.unsupported("use_bias", "biases on every projection (attention, MLPs, lm_head)")
    if f("moe_norm_min") != 1e-12:
        raise f.unsupported("moe_norm_min", "the routing weights are renormalised with a clamp at 1e-12")
    n = base["n_layers"]
    end = f("moe_layer_end_index")
    end = n - 1 if end == -1 else end
    shared = f("moe_num_shared_experts") or 0
    moe = MoEConfig(
        d_model=base["d_model"],
        d_hidden=f("moe_intermediate_size"),
        num_experts=f("moe_num_experts"),
        top_k=f("moe_k"),
        router="sigmoid_bias",
        score_func="softmax",
        norm_topk=True,
        num_shared_experts=shared,
        shared_d_hidden=f("moe_intermediate_size") if shared else None,
        aux_loss_coef=f("router_aux_loss_coef") or 0.0,
        z_loss_coef=0.0,
    )
    return ModelConfig(
        **base,
        moe=moe,
        dense_d_hidden=f("intermediate_size"),
        first_dense_layers=max(f("moe_layer_start_index"), 0),
        moe_every=f("moe_layer_interval"),
        dense_layers=tuple(range(max(end + 1, 0), n)),
    )


def from_moekit(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.moe
    errors = export_errors(cfg)
    if cfg.mla is not None:
        errors.append("multi-head latent attention")
    if m.router != "sigmoid_bias" or m.score_func != "softmax" or not m.norm_topk:
        errors.append(
            "ERNIE routes softmax scores chosen with a bias, renormalised "
            f"(router='sigmoid_bias', score_func='softmax', norm_topk=True; got {m.router!r}, "
            f"{m.score_func!r}, {m.norm_topk})"
        )
    if m.n_group != 1 or m.routed_scaling_factor != 1.0:
        errors.append(
            f"n_group={m.n_group} / routed_scaling_factor={m.routed_scaling_factor} (ERNIE has neither)"
        )
    if m.shared_gate or m.shared_hidden_total % m.d_hidden:
        errors.append("ERNIE's shared experts are ungated, each of the routed experts' width")
    if cfg.attn_bias or cfg.attn_out_bias or cfg.qk_norm or cfg.clip_qkv is not None:
        errors.append("attention biases / q-k norms / clip_qkv")
    layers = moe_layers(cfg)
    start, end, every = cfg.first_dense_layers, max(layers, default=-1), cfg.moe_every
    if layers != [i for i in range(cfg.n_layers) if (i + 1) % every == 0 and start <= i <= end]:
        errors.append(f"MoE layers {layers} are not an ERNIE range (start, end, interval)")
    refuse("ernie4_5_moe", errors)
    hf = common_hf(cfg, "ernie4_5_moe", "Ernie4_5_MoeForCausalLM")
    hf.update(
        intermediate_size=cfg.dense_hidden,
        moe_intermediate_size=m.d_hidden,
        moe_num_experts=m.num_experts,
        moe_k=m.top_k,
        moe_num_shared_experts=m.shared_hidden_total // m.d_hidden,
        moe_layer_start_index=start,
        moe_layer_end_index=end,
        moe_layer_interval=every,
        moe_norm_min=1e-12,
        use_bias=False,
        router_aux_loss_coef=m.aux_loss_coef,
        output_router_logits=False,
    )
    return hf


def _q(direction):
    def f(w: Tensor, cfg: ModelConfig, hf: dict) -> Tensor:
        return direction(w, cfg.n_heads, cfg.hd)

    return f


def _k(direction):
    def f(w: Tensor, cfg: ModelConfig, hf: dict) -> Tensor:
        return direction(w, cfg.kv_heads, cfg.hd)

    return f


ADAPTER = Adapter(
    model_type="ernie4_5_moe",
    architecture="Ernie4_5_MoeForCausalLM",
    to_moekit=to_moekit,
    from_moekit=from_moekit,
    renames=(
        ("ffn.router.expert_bias", "{moe}moe_statics.e_score_correction_bias"),
        ("ffn.shared_experts.mlp.", "{moe}shared_experts."),
    ),
    transforms=(
        ("ffn.router.expert_bias", lambda t, cfg, hf: t.reshape(-1), lambda t, cfg, hf: t.reshape(1, -1)),
        ("attn.q_proj.weight", _q(interleave_to_half), _q(half_to_interleave)),
        ("attn.k_proj.weight", _k(interleave_to_half), _k(half_to_interleave)),
    ),
    # transformers keeps the router in fp32 (_keep_in_fp32_modules_strict) and routes in fp32
    keep_fp32=("ffn.router.weight", "ffn.router.expert_bias"),
    ignore=(r"(.*\.)?mtp.*",),  # multi-token-prediction weights, unused by the causal LM
)
