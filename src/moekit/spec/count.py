"""A MoE model's parameters by component, from its config fields alone, as a ``SpecReport``.

Pure arithmetic, no torch. Each adapter below reads one architecture's HF ``config.json`` fields and
adds the tensors transformers' modelling code would build for it to a tally; tests/spec checks every
total against ``sum(p.numel())`` of a tiny instance. Core sizes are required; toggles that a
config.json may leave out (biases, sparse steps, tying) take transformers' class defaults. The FLOPs
and memory a report implies are in ``moekit.spec.report``.

Legend: V vocab, D model dim, L layers, H query heads, Hkv key/value heads, Dh head dim, E experts,
K experts per token, F expert hidden.

Conventions:
- ``total`` counts every stored weight once (a tied embedding / LM head once);
  DeepSeek-V3's ``e_score_correction_bias`` (a buffer in transformers) is counted, its MTP module is not.
- ``active`` is what one token touches: routed experts count K of E, and the input embedding and
  LM head both count in full. ``active_params_no_embedding`` drops the input embedding (untied models),
  the convention of the DeepSeek and gpt-oss model cards.
- ``matmul`` is what one token multiplies by: ``active`` without biases and norms, plus a tied LM head.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moekit.config import MLAConfig
from moekit.spec.report import COMPONENTS, AttentionLayer, Component, SpecReport

__all__ = ["SUPPORTED_MODEL_TYPES", "count_params"]

_MISSING: Any = object()


class _Tally:
    """Accumulates params per component while an adapter walks the model, layer by layer."""

    def __init__(self) -> None:
        self.parts = {name: [0, 0, 0] for name in COMPONENTS}
        self.attention: list[AttentionLayer] = []
        self.notes: list[str] = []
        self.moe_layers = 0

    def add(self, name: str, n: int, *, count: int = 1, active: int | None = None, matmul: bool = False) -> None:
        """``count`` copies of an ``n``-element tensor, ``active`` of them used per token."""
        act = count if active is None else active
        part = self.parts[name]
        part[0] += n * count
        part[1] += n * act
        part[2] += n * act if matmul else 0

    def linear(self, name: str, d_in: int, d_out: int, *, bias: bool = False, count: int = 1,
               active: int | None = None) -> None:
        self.add(name, d_in * d_out, count=count, active=active, matmul=True)
        if bias:
            self.add(name, d_out, count=count, active=active)

    def mlp(self, name: str, d: int, f: int, *, gated: bool = True, bias: bool = False) -> None:
        for _ in range(2 if gated else 1):  # gate (and up) D->F
            self.linear(name, d, f, bias=bias)
        self.linear(name, f, d, bias=bias)

    def moe(self, d: int, e: int, k: int, f: int, *, gated: bool = True, expert_bias: bool = False,
            router_bias: bool = False, score_bias: int = 0) -> None:
        if not 1 <= k <= e:  # active parameters would exceed the total
            raise ValueError(f"experts per token {k} (num_experts_per_tok / top_k) must be in [1, the "
                             f"number of experts {e}]")
        self.moe_layers += 1
        self.add("routed_experts", (3 if gated else 2) * d * f, count=e, active=k, matmul=True)
        if expert_bias:  # gate_up (2F) and down (D) biases per expert
            self.add("routed_experts", (2 * f if gated else f) + d, count=e, active=k)
        self.linear("router", d, e, bias=router_bias)
        self.add("router", score_bias)  # DeepSeek/ERNIE e_score_correction_bias: selection only

    def gqa(self, d: int, h: int, hkv: int, dh: int, *, qkv_bias: bool = False, o_bias: bool = False,
            qk_norm: tuple[int, int] = (0, 0), sinks: bool = False, window: int | None = None) -> None:
        self.linear("attention", d, h * dh, bias=qkv_bias)  # q
        self.linear("attention", d, hkv * dh, bias=qkv_bias, count=2)  # k, v
        self.linear("attention", h * dh, d, bias=o_bias)  # o
        self.add("norms", sum(qk_norm))
        self.add("attention", h if sinks else 0)  # gpt-oss per-head attention sinks
        self.attention.append(AttentionLayer(h, dh, dh, 2 * hkv * dh, window))

    def mla(self, d: int, h: int, q_rank: int | None, kv_rank: int, nope: int, rope: int, v_dim: int, *,
            bias: bool = False) -> None:
        """Multi-head latent attention (DeepSeek-V3; ``bias`` on q_a, kv_a and o as its attention_bias)."""
        if q_rank:  # q_a_proj D->Rq, q_a_layernorm, q_b_proj Rq->H*(nope+rope)
            self.linear("attention", d, q_rank, bias=bias)
            self.add("norms", q_rank)
            self.linear("attention", q_rank, h * (nope + rope))
        else:
            self.linear("attention", d, h * (nope + rope))
        self.linear("attention", d, kv_rank + rope, bias=bias)  # kv_a_proj_with_mqa
        self.add("norms", kv_rank)  # kv_a_layernorm
        self.linear("attention", kv_rank, h * (nope + v_dim))  # kv_b_proj
        self.linear("attention", h * v_dim, d, bias=bias)  # o_proj
        # MLA caches the compressed latent and the shared rope key, not per-head K and V
        self.attention.append(AttentionLayer(h, nope + rope, v_dim, kv_rank + rope))

    def finish(self, cfg: dict, *, v: int, d: int, tied: bool, norm: int = 1, lm_bias: bool = False,
               e: int = 0, k: int = 0, n_layers: int | None = None) -> SpecReport:
        """Input embedding, final norm and LM head, then freeze. ``norm``: params per norm element."""
        self.add("embeddings", v * d)
        self.add("norms", norm * d)
        self.add("lm_head", v * d, count=0 if tied else 1, matmul=True)
        self.parts["lm_head"][2] += v * d if tied else 0  # tied: the embedding's weights, multiplied again
        self.add("lm_head", v if lm_bias else 0)
        comps = {name: Component(*p) for name, p in self.parts.items()}
        return SpecReport(str(cfg.get("model_type") or "moekit"), comps, tuple(self.attention), tied, d,
                          n_layers if n_layers is not None else len(self.attention), self.moe_layers, e, k,
                          tuple(self.notes))


def _get(cfg: dict, *keys: str, default: Any = _MISSING) -> Any:
    """First of ``keys`` present and not null; required when no default is given."""
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    if default is _MISSING:
        alt = f" (or {', '.join(map(repr, keys[1:]))})" if len(keys) > 1 else ""
        raise ValueError(f"{cfg.get('model_type', 'moekit')} config is missing required field {keys[0]!r}{alt}")
    return default


def _attn_dims(cfg: dict) -> tuple[int, int, int, int]:
    d, h = _get(cfg, "hidden_size"), _get(cfg, "num_attention_heads")
    return d, h, _get(cfg, "num_key_value_heads", default=h), _get(cfg, "head_dim", default=d // h)


def _window(cfg: dict, i: int, *, all_layers: bool) -> int | None:
    types = cfg.get("layer_types")
    if types:
        return cfg.get("sliding_window") if types[i] == "sliding_attention" else None
    return cfg.get("sliding_window") if all_layers else None


def _mixtral_like(cfg: dict) -> SpecReport:
    """Every layer GQA + one routed MoE, no shared expert: mixtral, granitemoe, phimoe, olmoe, gpt_oss.

    Beyond Mixtral: attention biases (optional; gpt_oss on by default); phimoe LayerNorms with bias
    and an LM-head bias; olmoe q/k norms over the whole projection (hidden_size and (D/H)·Hkv, not
    one head); gpt_oss attention sinks, expert and router biases, alternating sliding-window layers.
    """
    mt, (d, h, hkv, dh) = cfg["model_type"], _attn_dims(cfg)
    oss, n_layers = mt == "gpt_oss", _get(cfg, "num_hidden_layers")
    e, k = _get(cfg, "num_local_experts", "num_experts"), _get(cfg, "num_experts_per_tok", "experts_per_token")
    bias = mt != "mixtral" and _get(cfg, "attention_bias", default=oss)
    norm = 2 if mt == "phimoe" else 1  # params per norm element
    if oss and not cfg.get("layer_types"):  # transformers' default: even layers slide
        cfg = {**cfg, "sliding_window": _get(cfg, "sliding_window", default=128),
               "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]}
    t = _Tally()
    for i in range(n_layers):
        t.gqa(d, h, hkv, dh, qkv_bias=bias, o_bias=bias, qk_norm=(d, d // h * hkv) if mt == "olmoe" else (0, 0),
              sinks=oss, window=_window(cfg, i, all_layers=True))
        t.moe(d, e, k, _get(cfg, "intermediate_size"), expert_bias=oss, router_bias=oss)
        t.add("norms", 2 * norm * d)
    return t.finish(cfg, v=_get(cfg, "vocab_size"), d=d, tied=_get(cfg, "tie_word_embeddings", default=False),
                    norm=norm, lm_bias=mt == "phimoe" and _get(cfg, "lm_head_bias", default=False), e=e, k=k)


def _qwen_moe(cfg: dict) -> SpecReport:
    """qwen2_moe and qwen3_moe: MoE where (i+1) % decoder_sparse_step == 0 and i not in mlp_only_layers."""
    qwen2 = cfg.get("model_type") == "qwen2_moe"
    d, h, hkv, dh = _attn_dims(cfg)
    n_layers, e, k = _get(cfg, "num_hidden_layers"), _get(cfg, "num_experts", "num_local_experts"), 0
    step, dense_only = _get(cfg, "decoder_sparse_step", default=1), _get(cfg, "mlp_only_layers", default=[])
    qkv_bias = _get(cfg, "qkv_bias", default=True) if qwen2 else _get(cfg, "attention_bias", default=False)
    sliding = _get(cfg, "use_sliding_window", default=False)
    t = _Tally()
    for i in range(n_layers):
        t.gqa(d, h, hkv, dh, qkv_bias=qkv_bias, o_bias=qkv_bias and not qwen2,
              qk_norm=(0, 0) if qwen2 else (dh, dh), window=_window(cfg, i, all_layers=True) if sliding else None)
        if i not in dense_only and e > 0 and (i + 1) % step == 0:
            k = _get(cfg, "num_experts_per_tok")
            t.moe(d, e, k, _get(cfg, "moe_intermediate_size"))
            if qwen2:  # always-on shared expert, scaled by sigmoid(shared_expert_gate(x)), gate D->1
                t.mlp("shared_experts", d, _get(cfg, "shared_expert_intermediate_size"))
                t.linear("shared_experts", d, 1)
        else:
            t.mlp("dense_mlp", d, _get(cfg, "intermediate_size"))
        t.add("norms", 2 * d)
    return t.finish(cfg, v=_get(cfg, "vocab_size"), d=d, tied=_get(cfg, "tie_word_embeddings", default=False),
                    e=e, k=k)


def _ernie4_5_moe(cfg: dict) -> SpecReport:
    d, h, hkv, dh = _attn_dims(cfg)
    n_layers = _get(cfg, "num_hidden_layers")
    e, k = _get(cfg, "moe_num_experts", "num_experts"), _get(cfg, "moe_k", "num_experts_per_tok")
    f, n_shared = _get(cfg, "moe_intermediate_size"), _get(cfg, "moe_num_shared_experts", default=2)
    start, end = _get(cfg, "moe_layer_start_index", default=1), _get(cfg, "moe_layer_end_index", default=-1)
    end = n_layers - 1 if end == -1 else end
    step, bias = _get(cfg, "moe_layer_interval", default=1), _get(cfg, "use_bias", default=False)
    t = _Tally()
    for i in range(n_layers):
        t.gqa(d, h, hkv, dh, qkv_bias=bias, o_bias=bias)
        if (i + 1) % step == 0 and start <= i <= end:
            t.moe(d, e, k, f, score_bias=e)  # moe_statics.e_score_correction_bias: an nn.Parameter here
            if n_shared > 0:
                t.mlp("shared_experts", d, f * n_shared, bias=bias)
        else:
            t.mlp("dense_mlp", d, _get(cfg, "intermediate_size"), bias=bias)
        t.add("norms", 2 * d)
    return t.finish(cfg, v=_get(cfg, "vocab_size"), d=d, tied=_get(cfg, "tie_word_embeddings", default=True),
                    lm_bias=bias, e=e, k=k)


def _deepseek_v3(cfg: dict) -> SpecReport:
    """Multi-head latent attention; first_k_dense_replace dense layers, then routed + shared experts.
    DeepSeek-V2 is the same without the routing bias, and with its own defaults."""
    d, h, n_layers = _get(cfg, "hidden_size"), _get(cfg, "num_attention_heads"), _get(cfg, "num_hidden_layers")
    v2 = cfg.get("model_type") == "deepseek_v2"
    if "q_lora_rank" not in cfg:  # null is meaningful (plain q_proj), absent is not
        raise ValueError(f"{cfg.get('model_type')} config is missing required field 'q_lora_rank'")
    q_rank, kv_rank = cfg["q_lora_rank"], _get(cfg, "kv_lora_rank")
    nope, rope, v_dim = _get(cfg, "qk_nope_head_dim"), _get(cfg, "qk_rope_head_dim"), _get(cfg, "v_head_dim")
    e, k, f = _get(cfg, "n_routed_experts"), _get(cfg, "num_experts_per_tok"), _get(cfg, "moe_intermediate_size")
    first_dense = _get(cfg, "first_k_dense_replace", default=0 if v2 else 3)
    bias = _get(cfg, "attention_bias", default=False)
    t = _Tally()
    for i in range(n_layers):
        t.mla(d, h, q_rank, kv_rank, nope, rope, v_dim, bias=bias)
        if i >= first_dense:
            t.moe(d, e, k, f, score_bias=0 if v2 else e)
            t.mlp("shared_experts", d, f * _get(cfg, "n_shared_experts", default=2 if v2 else 1))
        else:
            t.mlp("dense_mlp", d, _get(cfg, "intermediate_size"))
        t.add("norms", 2 * d)
    t.notes.append("MLA: the KV cache holds kv_lora_rank + qk_rope_head_dim per token per layer")
    if _get(cfg, "num_nextn_predict_layers", default=0):
        t.notes.append(f"excludes {cfg['num_nextn_predict_layers']} multi-token-prediction module(s)")
    return t.finish(cfg, v=_get(cfg, "vocab_size"), d=d, tied=_get(cfg, "tie_word_embeddings", default=False),
                    e=e, k=k)


def _dbrx(cfg: dict) -> SpecReport:
    d, h, n_layers = _get(cfg, "d_model"), _get(cfg, "n_heads"), _get(cfg, "n_layers")
    # attention and FFN sizes live in nested attn_config / ffn_config; flatten them for _get's messages
    sub = {**_get(cfg, "attn_config", default={}), **_get(cfg, "ffn_config"), "model_type": "dbrx"}
    hkv, e, k = _get(sub, "kv_n_heads", default=1), _get(sub, "moe_num_experts"), _get(sub, "moe_top_k")
    t = _Tally()
    for _ in range(n_layers):
        t.gqa(d, h, hkv, d // h)  # fused Wqkv + out_proj, same shapes
        t.moe(d, e, k, _get(sub, "ffn_hidden_size"))  # w1, v1, w2 per expert
        t.add("norms", 2 * d)  # LayerNorm without bias
    return t.finish(cfg, v=_get(cfg, "vocab_size"), d=d, tied=False, e=e, k=k)


def _jetmoe(cfg: dict) -> SpecReport:
    """Mixture of attention heads: each of E attention experts owns q and o projections; k/v are shared."""
    # the published config.json files keep the original JetMoE code's names (n_embd, moe_num_experts, ...)
    d, n_layers, hkv, dkv = (_get(cfg, "hidden_size", "n_embd"), _get(cfg, "num_hidden_layers", "n_layer"),
                             _get(cfg, "num_key_value_heads"), _get(cfg, "kv_channels", "head_dim"))
    e, k = _get(cfg, "num_local_experts", "moe_num_experts"), _get(cfg, "num_experts_per_tok", "moe_top_k")
    f = _get(cfg, "intermediate_size", "ffn_hidden_size")
    t = _Tally()
    for _ in range(n_layers):
        t.add("attention", 2 * d * hkv * dkv, count=e, active=k, matmul=True)  # MoA q and o experts
        t.add("attention", d)  # MoA output bias
        t.linear("router", d, e)  # MoA router
        t.linear("attention", d, 2 * hkv * dkv)  # kv_proj
        t.attention.append(AttentionLayer(hkv * k, dkv, dkv, 2 * hkv * dkv))
        t.moe(d, e, k, f)
        t.add("routed_experts", d)  # MoE output bias, used by every token
        t.add("norms", 2 * d)
    return t.finish(cfg, v=_get(cfg, "vocab_size"), d=d, tied=_get(cfg, "tie_word_embeddings", default=True),
                    e=e, k=k)


def _switch_transformers(cfg: dict) -> SpecReport:
    """Encoder-decoder; a token's active count spans both stacks (as if it went through each once).

    The input table ``shared`` feeds both stacks and is counted once, tied or not (untied,
    transformers 5 allocates each stack a copy of it).
    """
    d, dkv, h, v = _get(cfg, "d_model"), _get(cfg, "d_kv"), _get(cfg, "num_heads"), _get(cfg, "vocab_size")
    e, f, n_enc = _get(cfg, "num_experts"), _get(cfg, "d_ff"), _get(cfg, "num_layers")
    n_dec = _get(cfg, "num_decoder_layers", default=n_enc)
    t = _Tally()
    for n, sparse_key, decoder in ((n_enc, "num_sparse_encoder_layers", False),
                                   (n_dec, "num_sparse_decoder_layers", True)):
        n_sparse = _get(cfg, sparse_key, default=3)
        step = n // n_sparse if n_sparse > 0 else n  # transformers' rule, including its n_sparse=0 quirk
        for i in range(n):
            for _ in range(2 if decoder else 1):  # self-attention, and cross-attention in the decoder
                t.linear("attention", d, h * dkv, count=4)  # q, k, v, o
                t.add("norms", d)
                t.attention.append(AttentionLayer(h, dkv, dkv, 2 * h * dkv if decoder else 0))
            if i == 0:
                t.add("attention", _get(cfg, "relative_attention_num_buckets", default=32) * h)
            if step > 0 and (i % step == 1 or step == 1):
                t.moe(d, e, 1, f, gated=False, router_bias=_get(cfg, "router_bias", default=False))
            else:
                t.mlp("dense_mlp", d, f, gated=False)
            t.add("norms", 2 * d if i == n - 1 else d)  # FF norm, plus the stack's final norm
    t.notes.append("encoder-decoder: active and FLOPs count one pass through encoder and decoder; the KV "
                   "cache holds decoder self- and cross-attention, encoder as long as the decoder")
    return t.finish(cfg, v=v, d=d, tied=_get(cfg, "tie_word_embeddings", default=True), norm=0, e=e, k=1,
                    n_layers=n_enc + n_dec)


def _moekit(cfg: dict) -> SpecReport:
    """moekit's ModelConfig JSON (``ModelConfig.to_dict``, a run directory's config.json), kept here alone.

    Mirrors moekit.nn.transformer: RMSNorm pre-norm blocks; q/k/v biases with ``attn_bias``, an o_proj bias
    with ``attn_out_bias``, q/k norms with ``qk_norm`` (per head, or over the whole projection when
    ``qk_norm_scope`` is "full"; ``clip_qkv`` has no weights); ``mla`` replaces all of that attention with
    multi-head latent attention (bias-free, as moekit.nn.mla builds it). Layer i is MoE when not ``dense``,
    ``i >= first_dense_layers``, ``(i + 1) % moe_every == 0`` and i not in ``dense_layers``; dense layers
    are SwiGLU of ``dense_d_hidden`` (default top_k·d_hidden). ``moe.score_func`` changes no weight.
    """
    d, h, n_layers, moe = _get(cfg, "d_model"), _get(cfg, "n_heads"), _get(cfg, "n_layers"), _get(cfg, "moe")
    hkv, dh = _get(cfg, "n_kv_heads", default=h), _get(cfg, "head_dim", default=d // h)
    bias, qk_norm = _get(cfg, "attn_bias", default=False), _get(cfg, "qk_norm", default=False)
    out_bias, full_qk = _get(cfg, "attn_out_bias", default=False), cfg.get("qk_norm_scope") == "full"
    dense, first_dense = _get(cfg, "dense", default=False), _get(cfg, "first_dense_layers", default=0)
    dense_layers, mla = set(_get(cfg, "dense_layers", default=())), cfg.get("mla")
    e, k, f = _get(moe, "num_experts"), _get(moe, "top_k", default=2), _get(moe, "d_hidden")
    gated, router = moe.get("activation", "swiglu") == "swiglu", moe.get("router", "topk")
    if router == "dense":
        k = e
    elif router == "expert_choice":  # each expert takes capacity_factor·T·K/E tokens: that many per token
        k = min(e, round(k * (moe.get("capacity_factor") or 1.0)))
    t = _Tally()
    for i in range(n_layers):
        if mla:  # moekit.nn.mla: bias-free; MLAConfig's defaults for absent fields
            m = MLAConfig()
            t.mla(d, h, mla.get("q_lora_rank", m.q_lora_rank),
                  _get(mla, "kv_lora_rank", default=m.kv_lora_rank),
                  _get(mla, "qk_nope_head_dim", default=m.qk_nope_head_dim),
                  _get(mla, "qk_rope_head_dim", default=m.qk_rope_head_dim),
                  _get(mla, "v_head_dim", default=m.v_head_dim))
        else:
            norms = ((h * dh, hkv * dh) if full_qk else (dh, dh)) if qk_norm else (0, 0)
            t.gqa(d, h, hkv, dh, qkv_bias=bias, o_bias=out_bias, qk_norm=norms)
        if (not dense and i >= first_dense and (i + 1) % _get(cfg, "moe_every", default=1) == 0
                and i not in dense_layers):
            t.moe(d, e, k, f, gated=gated, score_bias=e if router == "sigmoid_bias" else 0)
            t.add("router", d * e if router == "noisy_topk" else 0)  # w_noise: training-time noise scale
            shared = _get(moe, "num_shared_experts", default=0)
            if shared:
                t.mlp("shared_experts", d, shared * _get(moe, "shared_d_hidden", default=f), gated=gated)
                if moe.get("shared_gate"):
                    t.linear("shared_experts", d, 1)
        else:
            t.mlp("dense_mlp", d, _get(cfg, "dense_d_hidden", default=_get(moe, "top_k", default=2) * f))
        t.add("norms", 2 * d)
    if router == "expert_choice":
        t.notes.append("expert_choice routing: active experts per token are an average")
    return t.finish({"model_type": "moekit"}, v=_get(cfg, "vocab_size"), d=d,
                    tied=_get(cfg, "tie_embeddings", default=True), e=0 if dense else e, k=0 if dense else k)


_ADAPTERS: dict[str, Callable[[dict], SpecReport]] = {
    "mixtral": _mixtral_like, "qwen2_moe": _qwen_moe, "qwen3_moe": _qwen_moe, "olmoe": _mixtral_like,
    "ernie4_5_moe": _ernie4_5_moe, "deepseek_v3": _deepseek_v3, "switch_transformers": _switch_transformers,
    "deepseek_v2": _deepseek_v3,
    "gpt_oss": _mixtral_like, "dbrx": _dbrx, "jetmoe": _jetmoe, "phimoe": _mixtral_like, "granitemoe": _mixtral_like,
    "moekit": _moekit,
}
SUPPORTED_MODEL_TYPES = tuple(_ADAPTERS)


def count_params(hf_config: dict) -> SpecReport:
    """Count an HF ``config.json`` dict (or moekit's ModelConfig JSON: no ``model_type``) by component."""
    model_type = hf_config.get("model_type") or "moekit"
    if model_type not in _ADAPTERS:
        raise ValueError(f"model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return _ADAPTERS[model_type](hf_config)
