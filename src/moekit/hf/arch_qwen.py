"""Qwen MoE: ``qwen2_moe`` (Qwen1.5/Qwen2-MoE) and ``qwen3_moe``.

Both: softmax top-k, renormalised only with ``norm_topk_prob`` (default False); layer i is MoE when
``i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0``, otherwise a SwiGLU MLP of
``intermediate_size``. qwen2_moe: q/k/v biases (``qkv_bias``, default True) and one shared expert
gated per token by ``sigmoid(shared_expert_gate(x))``. qwen3_moe: RMSNorm per head on q and k, no
shared expert, ``attention_bias`` on q/k/v/o.
"""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig, MoEConfig
from moekit.hf.adapter import Adapter
from moekit.hf.fields import Fields, common_hf, export_errors, moe_layers, refuse

__all__ = ["QWEN2_MOE", "QWEN3_MOE"]

_COMMON_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "num_hidden_layers": 24,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "decoder_sparse_step": 1,
    "norm_topk_prob": False,
    "router_aux_loss_coef": 0.001,
    "mlp_only_layers": None,
}
QWEN2_DEFAULTS = {
    **_COMMON_DEFAULTS,
    "intermediate_size": 5632,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_window_layers": 28,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "num_experts_per_tok": 4,
    "num_experts": 60,
    "qkv_bias": True,
    "layer_types": None,
}
QWEN3_DEFAULTS = {
    **_COMMON_DEFAULTS,
    "intermediate_size": 6144,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "attention_bias": False,
    "moe_intermediate_size": 768,
    "num_experts_per_tok": 8,
    "num_experts": 128,
}


def _layers(f: Fields, n_layers: int) -> dict[str, Any]:
    if not f("num_experts"):
        raise f.unsupported("num_experts", "a Qwen MoE config without experts is a dense model")
    only = f("mlp_only_layers") or []
    return {
        "moe_every": f("decoder_sparse_step"),
        "dense_layers": tuple(i for i in only if 0 <= i < n_layers),
    }


def _moe(f: Fields, d_model: int, **extra: Any) -> MoEConfig:
    return MoEConfig(
        d_model=d_model,
        d_hidden=f("moe_intermediate_size"),
        num_experts=f("num_experts"),
        top_k=f("num_experts_per_tok"),
        router="topk",
        norm_topk=bool(f("norm_topk_prob")),
        aux_loss_coef=f("router_aux_loss_coef"),
        z_loss_coef=0.0,
        **extra,
    )


def _window(f: Fields, sliding: tuple[int, ...] | None) -> dict[str, Any]:
    """sliding_window / sliding_layers: transformers slides only with use_sliding_window (qwen2_moe: in
    the layers ``layer_types`` names, qwen3_moe: in every layer)."""
    window = f("sliding_window")
    if not f("use_sliding_window") or not window or sliding == ():
        return {}
    return {"sliding_window": window, "sliding_layers": sliding}


def _window_hf(cfg: ModelConfig) -> dict[str, Any]:
    types = ["sliding_attention" if cfg.window(i) else "full_attention" for i in range(cfg.n_layers)]
    return {
        "use_sliding_window": cfg.sliding_window is not None,
        "sliding_window": cfg.sliding_window,
        "max_window_layers": cfg.n_layers,
        "layer_types": types,
    }


def qwen2_to_moekit(hf: dict[str, Any]) -> ModelConfig:
    f = Fields(hf, QWEN2_DEFAULTS, "qwen2_moe")
    base = f.common()
    # Qwen2MoeAttention: head_dim = getattr(config, "head_dim", hidden // heads)
    n = base["n_layers"]
    types = f("layer_types") or [
        "sliding_attention" if (i + 1) % 2 and i < f("max_window_layers") else "full_attention"
        for i in range(n)
    ]
    window = _window(f, tuple(i for i, t in enumerate(types) if t == "sliding_attention"))
    shared = f("shared_expert_intermediate_size")
    if not shared:
        raise f.unsupported("shared_expert_intermediate_size", "qwen2_moe always has a gated shared expert")
    moe = _moe(f, base["d_model"], num_shared_experts=1, shared_d_hidden=shared, shared_gate=True)
    return ModelConfig(
        **base, attn_bias=bool(f("qkv_bias")), moe=moe, dense_d_hidden=f("intermediate_size"), **_layers(f, n),
        **window,
    )


def qwen3_to_moekit(hf: dict[str, Any]) -> ModelConfig:
    f = Fields(hf, QWEN3_DEFAULTS, "qwen3_moe")
    base = f.common()
    bias = bool(f("attention_bias"))
    return ModelConfig(
        **base,
        attn_bias=bias,
        attn_out_bias=bias,
        qk_norm=True,
        qk_norm_scope="head",
        moe=_moe(f, base["d_model"]),
        dense_d_hidden=f("intermediate_size"),
        **_layers(f, base["n_layers"]),
        **_window(f, None),
    )


def _qwen_common_errors(cfg: ModelConfig) -> list[str]:
    m = cfg.moe
    errors = export_errors(cfg, windows=True)
    if cfg.mla is not None:
        errors.append("multi-head latent attention")
    if m.router != "topk":
        errors.append(f"router={m.router!r} (Qwen MoE routes softmax top-k: router='topk')")
    if cfg.clip_qkv is not None:
        errors.append(f"clip_qkv={cfg.clip_qkv}")
    return errors


def _qwen_common_hf(cfg: ModelConfig, model_type: str, arch: str) -> dict[str, Any]:
    m = cfg.moe
    hf = common_hf(cfg, model_type, arch)
    sparse = [i for i in range(cfg.n_layers) if (i + 1) % cfg.moe_every == 0]
    hf.update(
        intermediate_size=cfg.dense_hidden,
        moe_intermediate_size=m.d_hidden,
        num_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        norm_topk_prob=m.norm_topk,
        decoder_sparse_step=cfg.moe_every,
        mlp_only_layers=sorted(set(sparse) - set(moe_layers(cfg))),
        router_aux_loss_coef=m.aux_loss_coef,
        output_router_logits=False,
    )
    return hf


def qwen2_from_moekit(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.moe
    errors = _qwen_common_errors(cfg)
    if not (m.num_shared_experts and m.shared_gate):
        errors.append(
            "qwen2_moe needs a sigmoid-gated shared expert (num_shared_experts >= 1, shared_gate=True)"
        )
    if cfg.attn_out_bias or cfg.qk_norm:
        errors.append("o_proj bias / q-k norms (qwen2_moe has neither)")
    refuse("qwen2_moe", errors)
    hf = _qwen_common_hf(cfg, "qwen2_moe", "Qwen2MoeForCausalLM")
    hf.update(
        qkv_bias=cfg.attn_bias, shared_expert_intermediate_size=m.shared_hidden_total, **_window_hf(cfg)
    )
    return hf


def qwen3_from_moekit(cfg: ModelConfig) -> dict[str, Any]:
    errors = _qwen_common_errors(cfg)
    if cfg.moe.num_shared_experts:
        errors.append("shared experts (qwen3_moe has none)")
    if not cfg.qk_norm or cfg.qk_norm_scope != "head":
        errors.append("qwen3_moe needs per-head q/k RMSNorm (qk_norm=True, qk_norm_scope='head')")
    if cfg.attn_bias != cfg.attn_out_bias:
        errors.append("attention_bias covers q/k/v/o together (attn_bias must equal attn_out_bias)")
    if cfg.sliding_layers is not None and len(cfg.sliding_layers) != cfg.n_layers:
        errors.append(f"sliding_layers={cfg.sliding_layers} (qwen3_moe slides in every layer or none)")
    refuse("qwen3_moe", errors)
    hf = _qwen_common_hf(cfg, "qwen3_moe", "Qwen3MoeForCausalLM")
    window = _window_hf(cfg)
    hf.update(attention_bias=cfg.attn_bias, use_sliding_window=window["use_sliding_window"],
              sliding_window=cfg.sliding_window)
    return hf


QWEN2_MOE = Adapter(
    model_type="qwen2_moe",
    architecture="Qwen2MoeForCausalLM",
    to_moekit=qwen2_to_moekit,
    from_moekit=qwen2_from_moekit,
    renames=(
        ("ffn.shared_experts.mlp.", "{moe}shared_expert."),
        ("ffn.shared_experts.gate.", "{moe}shared_expert_gate."),
    ),
)
QWEN3_MOE = Adapter(
    model_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    to_moekit=qwen3_to_moekit,
    from_moekit=qwen3_from_moekit,
)
