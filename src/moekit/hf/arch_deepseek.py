"""DeepSeek-V3 (``model_type: deepseek_v3``): multi-head latent attention and sigmoid routing.

Routing (``DeepseekV3TopkRouter``): s = sigmoid(l) in fp32; the ``topk_group`` of ``n_group`` groups with
the largest sum of their two best s + e_score_correction_bias are eligible; top-k of s + bias among
them; weights = the chosen s, divided by (sum + 1e-20) when ``norm_topk_prob``, times
``routed_scaling_factor`` -- moekit's ``sigmoid_bias`` router. Shared experts: one SwiGLU MLP of
``moe_intermediate_size * n_shared_experts``, ungated. The first ``first_k_dense_replace`` layers are
dense MLPs of ``intermediate_size``. With ``rope_interleave`` (the default) the RoPE rows of q and of
the shared RoPE key are stored in interleaved pairs; they are permuted into moekit's rotate-half
layout on load and back on save. Multi-token-prediction layers (index >= num_hidden_layers) are skipped.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from moekit.config import MLAConfig, ModelConfig, MoEConfig
from moekit.config.rope import RopeScaling
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
from moekit.nn.rope import yarn_mscale

__all__ = ["ADAPTER", "MLA_RENAMES", "MLA_TRANSFORMS", "mla_config", "mla_softmax_scale"]

DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_interleave": True,
    "attention_bias": False,
}


def to_moekit(hf: dict[str, Any]) -> ModelConfig:
    f = Fields(hf, DEFAULTS, "deepseek_v3")
    base = f.common()
    if f("attention_bias"):
        raise f.unsupported("attention_bias", "multi-head latent attention without biases only")
    if hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise f.unsupported("scoring_func", "DeepSeek-V3 routing scores with a sigmoid")
    if hf.get("topk_method", "noaux_tc") != "noaux_tc":
        raise f.unsupported(
            "topk_method", "DeepSeek-V3 routing is 'noaux_tc' (group-limited, bias-corrected)"
        )
    E, n_group = f("n_routed_experts"), f("n_group") or 1
    if n_group > 1 and E // n_group < 2:
        raise f.unsupported(
            "n_group", f"groups score their two best experts: n_routed_experts={E} / n_group must be >= 2"
        )
    mla = mla_config(f, base["rope_scaling"])
    shared = f("n_shared_experts") or 0
    moe = MoEConfig(
        d_model=base["d_model"],
        d_hidden=f("moe_intermediate_size"),
        num_experts=E,
        top_k=f("num_experts_per_tok"),
        router="sigmoid_bias",
        norm_topk=bool(f("norm_topk_prob")),
        routed_scaling_factor=float(f("routed_scaling_factor")),
        n_group=n_group,
        topk_group=f("topk_group") or 1,
        group_score_top=2 if n_group > 1 else None,  # its gate sums a group's two best, whatever K/M
        num_shared_experts=shared,
        shared_d_hidden=f("moe_intermediate_size") if shared else None,
        aux_loss_coef=float(hf.get("aux_loss_alpha", 0.0)),
        seq_aux=bool(hf.get("seq_aux", True)),
        z_loss_coef=0.0,
    )
    base.update(head_dim=None, n_kv_heads=None)  # MLA: every head has its own k and v
    return ModelConfig(
        **base,
        mla=mla,
        moe=moe,
        dense_d_hidden=f("intermediate_size"),
        first_dense_layers=f("first_k_dense_replace") or 0,
    )


def mla_softmax_scale(a: MLAConfig, rope: RopeScaling | None) -> float | None:
    """DeepSeek's attention scale: None (= qk_head_dim ** -0.5), times yarn_mscale(factor, mscale_all_dim)
    squared when the RoPE scaling sets mscale_all_dim (the scale transformers' DeepSeek attention uses)."""
    if rope is None or not rope.mscale_all_dim:
        return None
    m = yarn_mscale(rope.factor, rope.mscale_all_dim)
    return a.qk_head_dim**-0.5 * m * m


def mla_config(f: Fields, rope: RopeScaling | None) -> MLAConfig:
    """The MLA shapes of a DeepSeek-V2 / V3 config.json, with the attention scale of its RoPE scaling."""
    a = MLAConfig(
        kv_lora_rank=f("kv_lora_rank"),
        qk_nope_head_dim=f("qk_nope_head_dim"),
        qk_rope_head_dim=f("qk_rope_head_dim"),
        v_head_dim=f("v_head_dim"),
        q_lora_rank=f("q_lora_rank"),
    )
    return a.replace(softmax_scale=mla_softmax_scale(a, rope))


def from_moekit(cfg: ModelConfig) -> dict[str, Any]:
    m, a = cfg.moe, cfg.mla
    errors = export_errors(cfg)
    if a is None:
        errors.append("DeepSeek-V3 needs multi-head latent attention (mla)")
    elif a.softmax_scale != mla_softmax_scale(a, cfg.rope_scaling) or a.latent_norm_eps != 1e-6:
        errors.append("mla.softmax_scale / mla.latent_norm_eps other than the defaults (or YaRN's scale)")
    if m.router != "sigmoid_bias" or m.score_func != "sigmoid":
        errors.append(
            f"router={m.router!r} score_func={m.score_func!r} (DeepSeek-V3: 'sigmoid_bias', 'sigmoid')"
        )
    if m.n_group > 1 and m.num_experts // m.n_group < 2:
        errors.append(f"groups of one expert (n_group={m.n_group})")
    if m.n_group > 1 and (m.group_score != "sum_top" or m.group_top != 2):
        errors.append(f"group_score={m.group_score!r} summing {m.group_top} (DeepSeek-V3 sums a group's two best)")
    if m.shared_gate or not m.num_shared_experts or m.shared_hidden_total % m.d_hidden:
        errors.append("DeepSeek-V3 has ungated shared experts, each of the routed experts' width")
    if moe_layers(cfg) != list(range(cfg.first_dense_layers, cfg.n_layers)):
        errors.append("MoE layers must be every layer from first_dense_layers on")
    refuse("deepseek_v3", errors)
    hf = common_hf(cfg, "deepseek_v3", "DeepseekV3ForCausalLM")
    hf.update(
        **deepseek_hf_fields(cfg),
        n_group=m.n_group,
        topk_group=m.topk_group,
        norm_topk_prob=m.norm_topk,
        rope_interleave=True,
        attention_bias=False,
        num_nextn_predict_layers=0,
    )
    return hf


def deepseek_hf_fields(cfg) -> dict:
    """The config.json fields DeepSeek-V2 and V3 share: MLA's dims, the MoE sizes, the dense prefix."""
    m, a = cfg.moe, cfg.mla
    return dict(num_key_value_heads=cfg.n_heads, head_dim=a.qk_rope_head_dim, intermediate_size=cfg.dense_hidden,
                moe_intermediate_size=m.d_hidden, n_routed_experts=m.num_experts, num_experts_per_tok=m.top_k,
                n_shared_experts=m.shared_hidden_total // m.d_hidden, routed_scaling_factor=m.routed_scaling_factor,
                first_k_dense_replace=cfg.first_dense_layers, kv_lora_rank=a.kv_lora_rank,
                q_lora_rank=a.q_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim,
                qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim)


def _rope_rows(direction, which: str):
    """Permute the RoPE rows of q (per head, after the no-RoPE part) or of kv_a_proj (after the latent)."""

    def f(w: Tensor, cfg: ModelConfig, hf: dict) -> Tensor:
        if not hf.get("rope_interleave", True):
            return w
        a = cfg.mla
        if which == "q":
            return direction(w, cfg.n_heads, a.qk_head_dim, a.qk_nope_head_dim, a.qk_rope_head_dim)
        return direction(w, 1, a.kv_lora_rank + a.qk_rope_head_dim, a.kv_lora_rank, a.qk_rope_head_dim)

    return f


# shared with DeepSeek-V2 (moekit.hf.arch_deepseek_v2), whose MLA checkpoints are laid out alike
MLA_RENAMES = (
    ("ffn.shared_experts.mlp.", "{moe}shared_experts."),
    ("attn.q_a_norm.", "self_attn.q_a_layernorm."),
    ("attn.kv_a_norm.", "self_attn.kv_a_layernorm."),
    ("attn.kv_a_proj.", "self_attn.kv_a_proj_with_mqa."),
)
MLA_TRANSFORMS = tuple(
    (s, _rope_rows(interleave_to_half, w), _rope_rows(half_to_interleave, w))
    for s, w in (
        ("attn.q_proj.weight", "q"),
        ("attn.q_b_proj.weight", "q"),
        ("attn.kv_a_proj.weight", "kv"),
    )
)

ADAPTER = Adapter(
    model_type="deepseek_v3",
    architecture="DeepseekV3ForCausalLM",
    to_moekit=to_moekit,
    from_moekit=from_moekit,
    renames=(("ffn.router.expert_bias", "{moe}gate.e_score_correction_bias"), *MLA_RENAMES),
    transforms=MLA_TRANSFORMS,
    ignore_extra_layers=True,
    passthrough=("rope_interleave",),  # keep the layout a loaded checkpoint had
)
