"""JetMoE (``model_type: jetmoe``; jetmoe-8b): a mixture of attention heads and a mixture of MLP experts.

Attention (``JetMoeMoA``, moekit.nn.moa): each token's top-k of E attention experts (softmax over the
picks) project its queries, ``kv_channels``-wide heads, ``num_key_value_heads`` per expert, against keys
and values shared by all experts; outputs weighted by the gates, plus a bias. MLP (``JetMoeMoE``):
top-k softmaxed over the picks -- moekit's ``topk`` router renormalised -- SwiGLU experts fused as
``input_linear`` (E, 2H, D), gate rows first, and ``output_linear`` (E, D, H), plus an output bias.
The block norms use eps 1e-6 whatever ``rms_norm_eps`` says (transformers' JetMoeRMSNorm default).
The published config.json files keep the original code's names (``n_embd``, ``n_layer``,
``n_positions``, ``moe_num_experts``, ``moe_top_k``, ``ffn_hidden_size``); they are read as the
transformers names when those are absent.
"""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig, MoEConfig
from moekit.hf.adapter import Adapter, ExpertNames
from moekit.hf.fields import Fields, common_hf, export_errors, moe_layers, refuse
from moekit.hf.fused_experts import fused_expert_io

__all__ = ["ADAPTER"]

DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "num_hidden_layers": 12,
    "num_key_value_heads": 16,
    "kv_channels": 128,
    "intermediate_size": 5632,
    "max_position_embeddings": 4096,
    "activation_function": "silu",
    "hidden_act": "silu",
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "aux_loss_coef": 0.01,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.01,
}
# published (original JetMoE code) name -> transformers name
PUBLISHED_NAMES = {
    "n_embd": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_positions": "max_position_embeddings",
    "moe_num_experts": "num_local_experts",
    "moe_top_k": "num_experts_per_tok",
    "ffn_hidden_size": "intermediate_size",
}
BLOCK_NORM_EPS = 1e-6


def _with_hf_names(hf: dict[str, Any]) -> dict[str, Any]:
    out = dict(hf)
    for published, name in PUBLISHED_NAMES.items():
        if published in hf and name not in hf:
            out[name] = hf[published]
    out.setdefault("hidden_act", hf.get("activation_function", "silu"))
    return out


def to_moekit(hf: dict[str, Any]) -> ModelConfig:
    f = Fields(_with_hf_names(hf), DEFAULTS, "jetmoe")
    if float(f("rms_norm_eps")) != BLOCK_NORM_EPS:
        raise f.unsupported("rms_norm_eps", f"JetMoE's block norms use {BLOCK_NORM_EPS} whatever it says; "
                            "moekit has one eps for every norm")
    kv, k, E = f("num_key_value_heads"), f("num_experts_per_tok"), f("num_local_experts")
    f.hf["num_attention_heads"] = kv * k  # as JetMoeConfig sets it
    base = f.common()
    base.update(n_heads=kv * k, n_kv_heads=kv, head_dim=f("kv_channels"))
    moe = MoEConfig(
        d_model=base["d_model"],
        d_hidden=f("intermediate_size"),
        num_experts=E,
        top_k=k,
        router="topk",
        norm_topk=True,
        output_bias=True,
        aux_loss_coef=float(f("aux_loss_coef")),
        z_loss_coef=0.0,
    )
    return ModelConfig(**base, moe=moe, attn_experts=E, attn_top_k=k)


def from_moekit(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.moe
    errors = export_errors(cfg, moa=True)
    if not cfg.attn_experts or cfg.attn_experts != m.num_experts or cfg.attn_top_k != m.top_k:
        errors.append("JetMoE has a mixture of attention with the MLP's expert count and top-k")
    if m.router != "topk" or not m.norm_topk or not m.output_bias or m.num_shared_experts:
        errors.append("JetMoE's MLP routes softmax over the top-k (router='topk', norm_topk), with an output bias")
    if cfg.norm_eps != BLOCK_NORM_EPS or cfg.attn_bias or cfg.attn_out_bias or cfg.clip_qkv is not None:
        errors.append(f"norm_eps other than {BLOCK_NORM_EPS} / attention biases / clip_qkv")
    if len(moe_layers(cfg)) != cfg.n_layers:
        errors.append("dense layers (every JetMoE layer is MoE)")
    refuse("jetmoe", errors)
    hf = common_hf(cfg, "jetmoe", "JetMoeForCausalLM")
    for key in ("head_dim", "hidden_act"):
        hf.pop(key)
    hf.update(
        kv_channels=cfg.hd,
        intermediate_size=m.d_hidden,
        num_local_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        activation_function="silu",
        aux_loss_coef=m.aux_loss_coef,
        output_router_logits=False,
    )
    return hf


ADAPTER = Adapter(
    model_type="jetmoe",
    architecture="JetMoeForCausalLM",
    to_moekit=to_moekit,
    from_moekit=from_moekit,
    renames=(
        ("attn.router.weight", "self_attention.experts.router.layer.weight"),
        ("attn.w_q", "self_attention.experts.input_linear.weight"),
        ("attn.w_o", "self_attention.experts.output_linear.weight"),
        ("attn.bias", "self_attention.experts.bias"),
        ("attn.kv_proj.", "self_attention.kv_proj."),
        ("ffn.router.weight", "mlp.router.layer.weight"),
        ("ffn.output_bias", "mlp.bias"),
    ),
    experts=ExpertNames(prefix="mlp."),
    fused=(fused_expert_io("mlp.input_linear.weight", "mlp.output_linear.weight"),),
)
