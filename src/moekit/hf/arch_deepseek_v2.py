"""DeepSeek-V2 and V2-Lite (``model_type: deepseek_v2``): multi-head latent attention, softmax routing.

Routing (``DeepseekV2TopkRouter``): p = softmax(l) in fp32; ``topk_method="greedy"`` takes the top-k p,
``"group_limited_greedy"`` first keeps the ``topk_group`` of ``n_group`` groups with the largest
*max* p; the chosen p are not renormalised (transformers ignores ``norm_topk_prob``) and are multiplied
by ``routed_scaling_factor``. In moekit that is the ``sigmoid_bias`` router with ``score_func="softmax"``,
``group_score="max"`` and a routing bias that stays zero (V2 balances with auxiliary losses; the bias
is not in its checkpoints). Shared experts: one ungated SwiGLU MLP of ``moe_intermediate_size *
n_shared_experts``; the first ``first_k_dense_replace`` layers are dense MLPs of ``intermediate_size``.
RoPE is applied to interleaved pairs, so the RoPE rows of q and of the shared key are permuted into
moekit's rotate-half layout on load and back on save (as for DeepSeek-V3, whose tables this reuses).
"""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig, MoEConfig
from moekit.hf.adapter import Adapter
from moekit.hf.arch_deepseek import (
    MLA_RENAMES,
    MLA_TRANSFORMS,
    deepseek_hf_fields,
    mla_config,
    mla_softmax_scale,
)
from moekit.hf.fields import Fields, common_hf, export_errors, moe_layers, refuse

__all__ = ["ADAPTER"]

TOPK_METHODS = ("greedy", "group_limited_greedy")

# DeepseekV2Config defaults (transformers 5), used for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    "vocab_size": 102400,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "moe_intermediate_size": 1407,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "n_shared_experts": 2,
    "n_routed_experts": 64,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "n_group": None,
    "topk_group": None,
    "topk_method": "greedy",
    "num_experts_per_tok": None,
    "first_k_dense_replace": 0,
    "norm_topk_prob": False,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "mlp_bias": False,
}


def _routing(f: Fields, d_model: int) -> MoEConfig:
    method = f("topk_method")
    if method not in TOPK_METHODS:
        raise f.unsupported("topk_method", f"DeepSeek-V2 routes with one of {TOPK_METHODS}")
    if f.hf.get("scoring_func", "softmax") != "softmax":
        raise f.unsupported("scoring_func", "DeepSeek-V2 routing scores with a softmax")
    if f.hf.get("moe_layer_freq", 1) != 1:
        raise f.unsupported("moe_layer_freq", "every layer from first_k_dense_replace on is MoE")
    if f("norm_topk_prob"):
        raise f.unsupported("norm_topk_prob", "DeepSeek-V2's routing weights are not renormalised")
    if f("num_experts_per_tok") is None:
        raise ValueError("deepseek_v2 config.json has no 'num_experts_per_tok'")
    groups = method == "group_limited_greedy"
    shared = f("n_shared_experts") or 0
    if not shared:
        raise f.unsupported("n_shared_experts", "DeepSeek-V2 layers always have shared experts (>= 1)")
    return MoEConfig(
        d_model=d_model,
        d_hidden=f("moe_intermediate_size"),
        num_experts=f("n_routed_experts"),
        top_k=f("num_experts_per_tok"),
        router="sigmoid_bias",
        score_func="softmax",
        group_score="max",
        norm_topk=False,
        routed_scaling_factor=float(f("routed_scaling_factor")),
        n_group=(f("n_group") or 1) if groups else 1,
        topk_group=(f("topk_group") or 1) if groups else 1,
        bias_update_rate=0.0,  # the routing bias is not part of the model: it must stay zero
        num_shared_experts=shared,
        shared_d_hidden=f("moe_intermediate_size"),
        aux_loss_coef=float(f.hf.get("aux_loss_alpha", 0.0)),
        seq_aux=bool(f.hf.get("seq_aux", True)),
        z_loss_coef=0.0,
    )


def to_moekit(hf: dict[str, Any]) -> ModelConfig:
    f = Fields(hf, DEFAULTS, "deepseek_v2")
    base = f.common()
    for key in ("attention_bias", "mlp_bias"):
        if f(key):
            raise f.unsupported(key, "DeepSeek-V2 without biases only")
    mla = mla_config(f, base["rope_scaling"])
    base.update(head_dim=None, n_kv_heads=None)  # MLA: every head has its own k and v
    return ModelConfig(
        **base,
        mla=mla,
        moe=_routing(f, base["d_model"]),
        dense_d_hidden=f("intermediate_size"),
        first_dense_layers=f("first_k_dense_replace") or 0,
    )


def _errors(cfg: ModelConfig) -> list[str]:
    m, a = cfg.moe, cfg.mla
    errors = export_errors(cfg)
    if a is None:
        errors.append("DeepSeek-V2 needs multi-head latent attention (mla)")
    elif a.softmax_scale != mla_softmax_scale(a, cfg.rope_scaling) or a.latent_norm_eps != 1e-6:
        errors.append("mla.softmax_scale / mla.latent_norm_eps other than the defaults (or YaRN's scale)")
    if m.router != "sigmoid_bias" or m.score_func != "softmax" or m.norm_topk:
        errors.append(
            f"router={m.router!r} score_func={m.score_func!r} norm_topk={m.norm_topk} (DeepSeek-V2: "
            "'sigmoid_bias' with a zero bias, 'softmax', not renormalised)"
        )
    if m.n_group > 1 and m.group_score != "max":
        errors.append(f"group_score={m.group_score!r} (DeepSeek-V2 scores a group by its best expert)")
    if m.shared_gate or not m.num_shared_experts or m.shared_hidden_total % m.d_hidden:
        errors.append("DeepSeek-V2 has ungated shared experts, each of the routed experts' width")
    if moe_layers(cfg) != list(range(cfg.first_dense_layers, cfg.n_layers)):
        errors.append("MoE layers must be every layer from first_dense_layers on")
    return errors


def from_moekit(cfg: ModelConfig) -> dict[str, Any]:
    errors = _errors(cfg)
    refuse("deepseek_v2", errors)
    m = cfg.moe
    hf = common_hf(cfg, "deepseek_v2", "DeepseekV2ForCausalLM")
    grouped = m.n_group > 1
    hf.update(
        **deepseek_hf_fields(cfg),
        topk_method="group_limited_greedy" if grouped else "greedy",
        n_group=m.n_group if grouped else None,
        topk_group=m.topk_group if grouped else None,
        norm_topk_prob=False,
        attention_bias=False,
        mlp_bias=False,
    )
    return hf


ADAPTER = Adapter(
    model_type="deepseek_v2",
    architecture="DeepseekV2ForCausalLM",
    to_moekit=to_moekit,
    from_moekit=from_moekit,
    renames=MLA_RENAMES,
    transforms=MLA_TRANSFORMS,
    # transformers keeps the router in fp32 (_keep_in_fp32_modules_strict) and routes in fp32
    keep_fp32=("ffn.router.weight", "ffn.router.expert_bias"),
    absent=("ffn.router.expert_bias",),
)
