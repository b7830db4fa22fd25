"""gpt-oss (``model_type: gpt_oss``; gpt-oss-20b / -120b): biased router and experts, clamped SwiGLU,
attention sinks, alternating sliding-window / full attention, YaRN RoPE, MXFP4 experts.

Routing (``GptOssTopKRouter``): l = x W^T + b; the top-k l, softmaxed over the picks -- moekit's
``topk`` router renormalised (softmax then renormalise over the top k is the same) with ``router_bias``.
Experts (``GptOssExperts``): ``gate_up_proj`` (E, D, 2H) with gate and up *interleaved* in its last dim,
``down_proj`` (E, H, D), each with a bias; the gate is ``swiglu_limit``-clamped (moekit.nn.biased_experts).
Attention: q/k/v/o biases (``attention_bias``), one learned sink logit per head, the layers of
``layer_types`` "sliding_attention" see ``sliding_window`` keys. Published checkpoints store the
expert weights as MXFP4 ``*_blocks`` / ``*_scales`` (``quantization_config.quant_method: mxfp4``,
moekit.hf.mxfp4): they are dequantized one expert at a time on load, and a model loaded from them
is saved back as MXFP4 (exactly, while its experts are unchanged); bf16 / fp32 checkpoints are read and
written in the fused layout above.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moekit.config import ModelConfig, MoEConfig
from moekit.hf.adapter import Adapter, Entry, ExpertNames, ExpertRows, FusedIO
from moekit.hf.fields import Fields, common_hf, export_errors, moe_layers, refuse
from moekit.hf.mxfp4 import dequantize_mxfp4, quantize_mxfp4

__all__ = ["ADAPTER"]

# GptOssConfig defaults (transformers 5), used for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "num_hidden_layers": 36,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "num_local_experts": 128,
    "num_experts_per_tok": 4,
    "sliding_window": 128,
    "layer_types": None,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "rope_theta": 150000.0,
    "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                        "truncate": False, "original_max_position_embeddings": 4096},
    "swiglu_alpha": 1.702,
    "swiglu_limit": 7.0,
    "router_aux_loss_coef": 0.001,
    "attention_bias": True,
}
LAYER_TYPES = ("sliding_attention", "full_attention")
EXPERTS = "mlp.experts."


def _layer_types(f: Fields, n: int) -> list[str]:
    types = f("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if len(types) != n or any(t not in LAYER_TYPES for t in types):
        raise f.unsupported("layer_types", f"{n} entries, each one of {LAYER_TYPES}")
    return types


def to_moekit(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("rope_parameters") is None and hf.get("rope_scaling") is None:
        hf = {**hf, "rope_parameters": DEFAULTS["rope_parameters"]}  # transformers' default is YaRN
    f = Fields(hf, DEFAULTS, "gpt_oss")
    base = f.common(quant_methods=("mxfp4",))
    types = _layer_types(f, base["n_layers"])
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    bias = bool(f("attention_bias"))
    top_k = hf.get("num_experts_per_tok") or hf.get("experts_per_token") or DEFAULTS["num_experts_per_tok"]
    moe = MoEConfig(
        d_model=base["d_model"],
        d_hidden=f("intermediate_size"),
        num_experts=f("num_local_experts"),
        top_k=top_k,
        router="topk",
        norm_topk=True,
        router_bias=True,
        expert_ffn_bias=True,
        swiglu_limit=float(f("swiglu_limit")),
        swiglu_alpha=float(f("swiglu_alpha")),
        aux_loss_coef=float(f("router_aux_loss_coef")),
        z_loss_coef=0.0,
    )
    return ModelConfig(
        **base,
        moe=moe,
        attn_bias=bias,
        attn_out_bias=bias,
        attn_sinks=True,
        sliding_window=f("sliding_window") if sliding else None,
        sliding_layers=sliding if sliding else None,
    )


def from_moekit(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.moe
    errors = export_errors(cfg, windows=True, sinks=True)
    if cfg.mla is not None:
        errors.append("multi-head latent attention")
    if m.router != "topk" or not m.norm_topk or not m.router_bias:
        errors.append("gpt-oss routes softmax over the top-k biased logits (router='topk', norm_topk, router_bias)")
    if not m.expert_ffn_bias or m.swiglu_limit is None or m.num_shared_experts:
        errors.append("gpt-oss experts have biases and a clamped SwiGLU (expert_ffn_bias, swiglu_limit), no shared ones")
    if not cfg.attn_sinks or cfg.attn_bias != cfg.attn_out_bias or cfg.qk_norm or cfg.clip_qkv is not None:
        errors.append("gpt-oss attention has sinks, biases on all of q/k/v/o or none, no q-k norm or clip")
    if len(moe_layers(cfg)) != cfg.n_layers:
        errors.append("dense layers (every gpt-oss layer is MoE)")
    refuse("gpt_oss", errors)
    hf = common_hf(cfg, "gpt_oss", "GptOssForCausalLM")
    types = ["sliding_attention" if cfg.window(i) else "full_attention" for i in range(cfg.n_layers)]
    hf.update(
        intermediate_size=m.d_hidden,
        num_local_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        layer_types=types,
        sliding_window=cfg.sliding_window or cfg.max_seq_len,  # unused when no layer slides
        swiglu_limit=m.swiglu_limit,
        swiglu_alpha=m.swiglu_alpha,
        attention_bias=cfg.attn_bias,
        router_aux_loss_coef=m.aux_loss_coef,
        output_router_logits=False,
    )
    return hf


# ------------------------------------------------------------------------------- expert tensors
_SUFFIXES = tuple(f"ffn.experts.{n}" for n in ("w_gate", "w_up", "w_down", "gate_bias", "up_bias", "down_bias"))


def _pick(x: Tensor, which: str, dim: int) -> Tensor:
    """The gate (even) or up (odd) half of an interleaved gate_up tensor along ``dim``; all of a down one."""
    if which in ("w_down", "down_bias"):
        return x
    start = 0 if which in ("w_gate", "gate_bias") else 1
    return x.unfold(dim, 2, 2).select(-1, start)


def _source(plan: Any, layer: str, suffix: str, shape: tuple[int, ...]) -> tuple[str, Any]:
    """Read w_gate / w_up (E, H, D), w_down (E, D, H) and the biases from fused or MXFP4 tensors."""
    which, reader = suffix.rsplit(".", 1)[1], plan.reader
    proj = layer + EXPERTS + ("down_proj" if which in ("w_down", "down_bias") else "gate_up_proj")
    E, R = shape[0], shape[1]
    rows = R if which in ("w_down", "down_bias") else 2 * R  # of the stored (out, in) matrix
    if which.endswith("_bias"):
        plan.need(proj + "_bias", (E, rows))
        return ("fn", lambda dst: dst.copy_(_pick(reader.get(proj + "_bias"), which, 1)))
    C = shape[2]
    if proj + "_blocks" in reader:  # MXFP4: dequantize one expert at a time, straight into dst
        plan.need(proj + "_blocks", (E, rows, C // 32, 16))
        plan.need(proj + "_scales", (E, rows, C // 32))

        def fill_mxfp4(dst: Tensor) -> None:
            for e in range(E):  # only the rows of dst[e] (gate: even, up: odd), dequantized in place
                blocks, scales = reader.get(proj + "_blocks", index=e), reader.get(proj + "_scales", index=e)
                dequantize_mxfp4(_pick(blocks, which, 0), _pick(scales, which, 0), out=dst[e])

        return ("fn", fill_mxfp4)
    plan.need(proj, (E, C, rows))  # fused, (in, out) per expert

    def fill_fused(dst: Tensor) -> None:
        for e in range(E):
            dst[e].copy_(_pick(reader.get(proj, index=e), which, 1).t())

    return ("fn", fill_fused)


def _interleave(gate: Tensor, up: Tensor, dim: int) -> Tensor:
    return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)


def _quantized(w_ERC: Tensor) -> tuple[Tensor, Tensor]:
    pairs = [quantize_mxfp4(w_ERC[e]) for e in range(w_ERC.shape[0])]
    return torch.stack([b for b, _ in pairs]), torch.stack([s for _, s in pairs])


def _entries(layer: str, t: dict[str, Tensor], hf: dict[str, Any]) -> list[Entry]:
    """gate_up_proj / down_proj (+ biases) of one layer, fused or, for an MXFP4 model, as blocks + scales."""
    g, u, d = (t[f"ffn.experts.{n}"] for n in ("w_gate", "w_up", "w_down"))
    E, H, D = g.shape
    p = layer + EXPERTS
    out: list[Entry] = [
        (p + "gate_up_proj_bias", (E, 2 * H), g.dtype,
         lambda: _interleave(t["ffn.experts.gate_bias"], t["ffn.experts.up_bias"], 1)),
        (p + "down_proj_bias", (E, D), g.dtype, lambda: t["ffn.experts.down_bias"]),
    ]
    if (hf.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        for name, w, rows, cols in (("gate_up_proj", lambda: _interleave(g, u, 1), 2 * H, D),
                                    ("down_proj", lambda: d, D, H)):
            done: dict[str, Tensor] = {}  # blocks and scales from one quantization, the first asked for

            def part(i: int, w=w, done=done) -> Tensor:
                if not done:
                    done["blocks"], done["scales"] = _quantized(w())
                return done.pop(("blocks", "scales")[i])

            out.append((p + name + "_blocks", (E, rows, cols // 32, 16), torch.uint8, lambda part=part: part(0)))
            out.append((p + name + "_scales", (E, rows, cols // 32), torch.uint8, lambda part=part: part(1)))
        return out
    out.append((p + "gate_up_proj", (E, D, 2 * H), g.dtype, lambda: _interleave(g, u, 1).transpose(1, 2)))
    out.append((p + "down_proj", (E, H, D), g.dtype, lambda: d.transpose(1, 2)))
    return out


ADAPTER = Adapter(
    model_type="gpt_oss",
    architecture="GptOssForCausalLM",
    to_moekit=to_moekit,
    from_moekit=from_moekit,
    renames=(("ffn.router.", "{moe}router."),),
    experts=ExpertNames(prefix="mlp."),
    # bf16 / fp32 checkpoints: one expert's gate_up row holds its gate and up (alternate columns), its
    # down_proj row the transpose of its down matrix (MXFP4 blocks are not offloaded)
    fused=(FusedIO(_SUFFIXES, _source, _entries, ExpertRows(EXPERTS + "down_proj", down_transposed=True,
                                                           gate_up_interleaved=EXPERTS + "gate_up_proj")),),
    passthrough=("quantization_config",),  # a model loaded from MXFP4 is saved as MXFP4
)
