"""DBRX (``model_type: dbrx``): fine-grained MoE with clipped fused QKV and bias-free LayerNorms.

Routing (``DbrxFFN``): p = softmax(l); the top-k p divided by their ``moe_normalize_expert_weights``-norm
(1: renormalised to sum 1 -- moekit's ``topk`` router; null: raw top-k p). Attention: one ``Wqkv``
(q rows, then k, then v) whose output is clamped to [-clip_qkv, clip_qkv] -- moekit's clip_qkv on q, k
and v -- and ``out_proj``; no biases. Norms: LayerNorm with a weight and no bias (eps 1e-5). Experts:
``ffn.experts.mlp.w1`` / ``v1`` / ``w2``, each (E * H, D): expert e's gate, up and *transposed* down
matrix are rows [e H, (e + 1) H). Everything lives under ``transformer.`` (``wte``, ``blocks.{i}``,
``norm_f``). The config nests its fields in ``attn_config`` and ``ffn_config``; transformers 5 takes the
RoPE base from ``rope_parameters`` and ignores ``attn_config.rope_theta``, which moekit uses only when a
config (as published) has no ``rope_parameters``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moekit.config import ModelConfig, MoEConfig
from moekit.hf.adapter import Adapter, Entry, ExpertRows, FusedIO
from moekit.hf.fields import export_errors, moe_layers, refuse
from moekit.hf.rope_fields import rope_from_hf, rope_to_hf

__all__ = ["ADAPTER"]

ATTN_DEFAULTS: dict[str, Any] = {"clip_qkv": None, "kv_n_heads": 1, "rope_theta": 10000.0}
FFN_DEFAULTS: dict[str, Any] = {"ffn_hidden_size": 3584, "moe_num_experts": 4, "moe_top_k": 1,
                                "moe_normalize_expert_weights": 1.0, "moe_loss_weight": 0.01,
                                "moe_jitter_eps": None, "ffn_act_fn": {"name": "silu"}}
NORM_EPS = 1e-5  # nn.LayerNorm's default, which DBRX uses


def _sub(hf: dict[str, Any], key: str, defaults: dict[str, Any]) -> dict[str, Any]:
    return {**defaults, **(hf.get(key) or {})}  # null is meaningful (no clip, raw weights)


def to_moekit(hf: dict[str, Any]) -> ModelConfig:
    attn, ffn = _sub(hf, "attn_config", ATTN_DEFAULTS), _sub(hf, "ffn_config", FFN_DEFAULTS)
    if (ffn["ffn_act_fn"] or {}).get("name", "silu") != "silu":
        raise ValueError(f"dbrx: ffn_config.ffn_act_fn={ffn['ffn_act_fn']!r} is not supported by moekit (silu only)")
    p = ffn["moe_normalize_expert_weights"]
    if p not in (None, 1, 1.0):
        raise ValueError(
            f"dbrx: ffn_config.moe_normalize_expert_weights={p!r} is not supported by moekit (1 or null)"
        )
    if hf.get("quantization_config"):
        raise ValueError(f"dbrx: quantization_config={hf['quantization_config']!r} is not supported by moekit")
    d, heads, max_pos = hf.get("d_model", 2048), hf.get("n_heads", 16), hf.get("max_seq_len", 2048)
    theta, scaling, longest = rope_from_hf(hf, "dbrx", attn["rope_theta"], max_pos)
    moe = MoEConfig(
        d_model=d,
        d_hidden=ffn["ffn_hidden_size"],
        num_experts=ffn["moe_num_experts"],
        top_k=ffn["moe_top_k"],
        router="topk",
        norm_topk=p is not None,
        aux_loss_coef=float(ffn["moe_loss_weight"]),
        z_loss_coef=0.0,
        router_jitter=float(ffn["moe_jitter_eps"] or 0.0),
    )
    return ModelConfig(
        vocab_size=hf.get("vocab_size", 32000), d_model=d, n_layers=hf.get("n_layers", 24), n_heads=heads,
        n_kv_heads=attn["kv_n_heads"], max_seq_len=longest, rope_theta=theta, rope_scaling=scaling,
        norm_eps=NORM_EPS, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)), moe=moe, clip_qkv=attn["clip_qkv"],
        norm_type="layer",
    )


def from_moekit(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.moe
    errors = export_errors(cfg, layer_norm=True)
    if cfg.mla is not None or cfg.norm_type != "layer" or cfg.norm_eps != NORM_EPS:
        errors.append(f"DBRX has GQA and bias-free LayerNorms of eps {NORM_EPS} (norm_type='layer')")
    if m.router != "topk" or m.num_shared_experts:
        errors.append("DBRX routes softmax top-k (router='topk'), no shared experts")
    if cfg.attn_bias or cfg.attn_out_bias or cfg.qk_norm or cfg.head_dim not in (None, cfg.d_model // cfg.n_heads):
        errors.append("attention biases / q-k norms / a head_dim other than d_model // n_heads")
    if len(moe_layers(cfg)) != cfg.n_layers:
        errors.append("dense layers (every DBRX layer is MoE)")
    if cfg.tie_embeddings:
        errors.append("tie_embeddings (DBRX's head is its own)")
    refuse("dbrx", errors)
    rope = rope_to_hf(cfg)
    return {
        "architectures": ["DbrxForCausalLM"], "model_type": "dbrx", "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model, "n_heads": cfg.n_heads, "n_layers": cfg.n_layers,
        "max_seq_len": rope["max_position_embeddings"], "rope_parameters": rope["rope_parameters"],
        "attn_config": {"kv_n_heads": cfg.kv_heads, "clip_qkv": cfg.clip_qkv, "rope_theta": cfg.rope_theta},
        "ffn_config": {"ffn_hidden_size": m.d_hidden, "moe_num_experts": m.num_experts, "moe_top_k": m.top_k,
                       "moe_normalize_expert_weights": 1.0 if m.norm_topk else None,
                       "moe_loss_weight": m.aux_loss_coef, "moe_jitter_eps": m.router_jitter or None,
                       "ffn_act_fn": {"name": "silu"}},
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "use_cache": True,
    }


# ------------------------------------------------------------------------------- fused tensors
QKV = ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight")
EXPERTS = {"ffn.experts.w_gate": "w1", "ffn.experts.w_up": "v1", "ffn.experts.w_down": "w2"}
_MLP = "ffn.experts.mlp."


def _qkv_source(plan: Any, layer: str, suffix: str, shape: tuple[int, ...]) -> tuple[str, Any]:
    """q is rows [0, D) of Wqkv (DBRX's head_dim is D / n_heads), k the next kv rows, v the last."""
    key, (rows, D) = layer + "norm_attn_norm.attn.Wqkv.weight", shape
    start = {QKV[0]: 0, QKV[1]: D, QKV[2]: D + rows}[suffix]
    plan.need(key, None if suffix == QKV[0] else (D + 2 * rows, D))  # k and v know the whole shape
    return ("fn", lambda dst: dst.copy_(plan.reader.get(key)[start : start + rows]))


def _qkv_entries(layer: str, t: dict[str, Tensor], hf: dict[str, Any]) -> list[Entry]:
    q, k, v = (t[s] for s in QKV)
    n = q.shape[0] + k.shape[0] + v.shape[0]
    return [(layer + "norm_attn_norm.attn.Wqkv.weight", (n, q.shape[1]), q.dtype, lambda: torch.cat([q, k, v]))]


def _expert_source(plan: Any, layer: str, suffix: str, shape: tuple[int, ...]) -> tuple[str, Any]:
    key, E = layer + _MLP + EXPERTS[suffix], shape[0]
    H, D = (shape[2], shape[1]) if suffix == "ffn.experts.w_down" else (shape[1], shape[2])
    plan.need(key, (E * H, D))

    def fill(dst: Tensor) -> None:
        for e in range(E):  # rows of expert e only
            w = plan.reader.get(key, index=slice(e * H, (e + 1) * H))
            dst[e].copy_(w.t() if suffix == "ffn.experts.w_down" else w)

    return ("fn", fill)


def _expert_entries(layer: str, t: dict[str, Tensor], hf: dict[str, Any]) -> list[Entry]:
    out: list[Entry] = []
    for suffix, name in EXPERTS.items():
        w = t[suffix].transpose(1, 2) if suffix == "ffn.experts.w_down" else t[suffix]  # (E, H, D)
        E, H, D = w.shape
        out.append((layer + _MLP + name, (E * H, D), w.dtype, lambda w=w: w.reshape(-1, w.shape[2])))
    return out


# one expert's w1 / v1 rows are its gate / up; its w2 rows are its down matrix transposed
_ROWS = ExpertRows(_MLP + "w2", gate=_MLP + "w1", up=_MLP + "v1", down_transposed=True, flat=True)

ADAPTER = Adapter(
    model_type="dbrx",
    architecture="DbrxForCausalLM",
    to_moekit=to_moekit,
    from_moekit=from_moekit,
    renames=(
        ("attn_norm.", "norm_attn_norm.norm_1."),
        ("ffn_norm.", "norm_attn_norm.norm_2."),
        ("attn.o_proj.", "norm_attn_norm.attn.out_proj."),
        ("ffn.router.weight", "ffn.router.layer.weight"),
    ),
    fused=(FusedIO(QKV, _qkv_source, _qkv_entries), FusedIO(tuple(EXPERTS), _expert_source, _expert_entries, _ROWS)),
    layer_prefix="transformer.blocks.",
    global_names=(("embed.weight", "transformer.wte.weight"), ("norm.weight", "transformer.norm_f.weight")),
)
