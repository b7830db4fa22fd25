"""moekit spec: counts from config fields, checked against transformers models built from tiny configs.

The main check: for every architecture, ``count_params(config.json)`` equals the number of elements
transformers allocates for that config (built on the meta device, so nothing is materialised), and
the active count equals the same sum with each routed expert tensor weighted by K/E.
"""
from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch
import transformers

from moekit.spec import (
    PRESETS,
    PUBLISHED,
    Published,
    SUPPORTED_MODEL_TYPES,
    count_params,
    flops_per_token,
    get_preset,
    memory,
)
from moekit.spec.cli import main

# Tiny configs: odd sizes so that a swapped dimension changes the count; several per architecture
# to cover ties, biases, sparse steps, dense layers and q-LoRA on/off.
_BASE: dict[str, Any] = {"vocab_size": 97, "hidden_size": 24, "intermediate_size": 20, "num_hidden_layers": 3,
                         "num_attention_heads": 4, "num_key_value_heads": 2}
_SWITCH: dict[str, Any] = {"vocab_size": 97, "d_model": 24, "d_kv": 6, "d_ff": 20, "num_heads": 4}
TINY: list[tuple[str, dict[str, Any]]] = [
    ("mixtral", dict(_BASE, num_local_experts=4, num_experts_per_tok=2)),
    ("mixtral", dict(_BASE, num_local_experts=3, num_experts_per_tok=1, head_dim=10, tie_word_embeddings=True)),
    ("qwen2_moe", dict(_BASE, num_experts=5, num_experts_per_tok=2, moe_intermediate_size=12,
                       shared_expert_intermediate_size=14)),
    ("qwen2_moe", dict(_BASE, num_hidden_layers=5, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=12,
                       shared_expert_intermediate_size=14, decoder_sparse_step=2, mlp_only_layers=[3],
                       qkv_bias=False, tie_word_embeddings=True)),
    ("qwen3_moe", dict(_BASE, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=12, head_dim=10)),
    ("qwen3_moe", dict(_BASE, num_hidden_layers=4, num_experts=4, num_experts_per_tok=3, moe_intermediate_size=12,
                       decoder_sparse_step=2, mlp_only_layers=[0], attention_bias=True)),
    ("olmoe", dict(_BASE, num_experts=5, num_experts_per_tok=2)),
    ("olmoe", dict(_BASE, num_experts=4, num_experts_per_tok=2, attention_bias=True, tie_word_embeddings=True)),
    ("ernie4_5_moe", dict(_BASE, num_hidden_layers=4, moe_num_experts=5, moe_k=2, moe_intermediate_size=12,
                          moe_num_shared_experts=2, tie_word_embeddings=False)),
    ("ernie4_5_moe", dict(_BASE, num_hidden_layers=5, moe_num_experts=4, moe_k=2, moe_intermediate_size=12,
                          moe_num_shared_experts=0, moe_layer_start_index=0, moe_layer_end_index=3,
                          moe_layer_interval=2, use_bias=True, head_dim=10)),
    ("deepseek_v3", dict(_BASE, num_hidden_layers=4, num_key_value_heads=4, n_routed_experts=6,
                         num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=12,
                         n_shared_experts=2, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=14,
                         qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=8)),
    ("deepseek_v3", dict(_BASE, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                         topk_group=1, moe_intermediate_size=12, n_shared_experts=1, first_k_dense_replace=0,
                         q_lora_rank=None, kv_lora_rank=14, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=8,
                         attention_bias=True)),
    ("deepseek_v2", dict(_BASE, num_hidden_layers=4, num_key_value_heads=4, n_routed_experts=6,
                         num_experts_per_tok=2, topk_method="group_limited_greedy", n_group=2, topk_group=1,
                         moe_intermediate_size=12, n_shared_experts=2, first_k_dense_replace=1, q_lora_rank=16,
                         kv_lora_rank=14, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=8)),
    ("deepseek_v2", dict(_BASE, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=12, n_shared_experts=1, q_lora_rank=None, kv_lora_rank=14,
                         qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=8)),
    ("gpt_oss", dict(_BASE, num_hidden_layers=4, num_local_experts=5, num_experts_per_tok=2, head_dim=10,
                     sliding_window=8)),
    ("dbrx", {"vocab_size": 97, "d_model": 24, "n_heads": 4, "n_layers": 3,
              "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0},
              "ffn_config": {"ffn_hidden_size": 20, "moe_num_experts": 4, "moe_top_k": 2}}),
    ("jetmoe", {**_BASE, "kv_channels": 6, "num_local_experts": 4, "num_experts_per_tok": 2}),
    ("phimoe", dict(_BASE, num_local_experts=4, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True)),
    ("granitemoe", dict(_BASE, num_local_experts=4, num_experts_per_tok=2, attention_bias=True,
                        tie_word_embeddings=True)),
    ("switch_transformers", {**_SWITCH, "num_layers": 4, "num_decoder_layers": 3, "num_experts": 4,
                             "num_sparse_encoder_layers": 2, "num_sparse_decoder_layers": 3, "router_bias": True}),
    ("switch_transformers", {**_SWITCH, "num_layers": 2, "num_decoder_layers": 4, "num_experts": 3,
                             "num_sparse_encoder_layers": 1, "num_sparse_decoder_layers": 2,
                             "tie_word_embeddings": False}),
]


def _routed_weight(model_type: str, name: str, k: int, e: int) -> float:
    """Fraction of a parameter one token uses: K/E for routed expert tensors, else 1."""
    routed = r"(input|output)_linear" if model_type == "jetmoe" else r"(^|\.)experts\."
    return k / e if re.search(routed, name) else 1.0


def _build(model_type: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    auto = (transformers.AutoModelForSeq2SeqLM if model_type == "switch_transformers"
            else transformers.AutoModelForCausalLM)
    with torch.device("meta"):
        model = auto.from_config(cfg)
    return json.loads(cfg.to_json_string()), model  # what save_pretrained writes to config.json


@pytest.mark.parametrize(("model_type", "kwargs"), TINY, ids=[f"{m}-{i}" for i, (m, _) in enumerate(TINY)])
def test_counts_match_transformers_exactly(model_type: str, kwargs: dict[str, Any]) -> None:
    config_json, model = _build(model_type, kwargs)
    report = count_params(config_json)
    tensors = dict(model.named_parameters())
    # DeepSeek-V3 keeps e_score_correction_bias as a buffer; it is in the checkpoint, so it counts
    tensors |= {n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    if model_type == "switch_transformers" and not config_json["tie_word_embeddings"]:
        # untied, transformers 5 gives each stack its own copy of `shared` (checkpoints store equal
        # values); the spec counts the one input table, as a tied model has it
        del tensors["encoder.embed_tokens.weight"], tensors["decoder.embed_tokens.weight"]
    assert report.total_params == sum(p.numel() for p in tensors.values())
    e, k = report.num_experts, report.experts_per_token
    active = sum(p.numel() * _routed_weight(model_type, n, k, e) for n, p in tensors.items())
    assert report.active_params == pytest.approx(active, abs=0.5)


def _component_of(name: str) -> str:
    """Which SpecReport component a transformers parameter name belongs to (decoder-only models)."""
    rules = [("lm_head", r"lm_head"), ("embeddings", r"embed_tokens"), ("norms", r"norm"),
             ("shared_experts", r"shared_expert"), ("routed_experts", r"(^|\.)experts\."),
             ("router", r"\.(gate|router)\."), ("attention", r"self_attn\."), ("dense_mlp", r"\.mlp\.")]
    return next(comp for comp, pattern in rules if re.search(pattern, name))


@pytest.mark.parametrize("idx", [i for i, (m, _) in enumerate(TINY)
                                 if m in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "ernie4_5_moe",
                                          "deepseek_v3", "deepseek_v2", "gpt_oss", "phimoe", "granitemoe")])
def test_component_split_matches_transformers(idx: int) -> None:
    model_type, kwargs = TINY[idx]
    config_json, model = _build(model_type, kwargs)
    report = count_params(config_json)
    expected: dict[str, int] = {}
    named = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if "e_score" in n]
    for name, p in named:
        expected[_component_of(name)] = expected.get(_component_of(name), 0) + p.numel()
    got = {n: c.total for n, c in report.components.items() if c.total}
    assert got == expected


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_presets_match_published_figures(name: str) -> None:
    """Within one unit of the last digit the source gives (sources round or truncate), as the README says."""
    report, pub = count_params(get_preset(name)), PUBLISHED[name]
    active = report.active_params if pub.convention == "with_embedding" else report.active_params_no_embedding
    assert pub.source and pub.total.endswith("B") and pub.active.endswith("B")
    assert abs(report.total_params - Published.value(pub.total)) < Published.unit(pub.total)
    assert abs(active - Published.value(pub.active)) < Published.unit(pub.active)
    assert pub.agrees(report.total_params, active)
    assert not pub.agrees(report.total_params * 1.02, active)  # a 2% miscount is caught at these digits


def test_preset_flags_and_conventions() -> None:
    ds = count_params(get_preset("deepseek-v3"))
    emb = 129280 * 7168
    assert ds.components["embeddings"].total == ds.components["lm_head"].total == emb
    assert ds.active_params_no_embedding == ds.active_params - emb
    assert ds.num_moe_layers == 58 and ds.components["dense_mlp"].total == 3 * 3 * 7168 * 18432
    assert any("multi-token-prediction" in note for note in ds.notes)
    assert set(PRESETS) >= {"mixtral-8x7b", "mixtral-8x22b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b",
                            "olmoe-1b-7b", "deepseek-v3"}
    assert get_preset("Mixtral-8x7B") == PRESETS["mixtral-8x7b"] and get_preset("mixtral-8x7b") is not PRESETS[
        "mixtral-8x7b"]


def test_kv_cache_and_flops() -> None:
    mix = count_params(get_preset("mixtral-8x7b"))
    kv = memory(mix, seq_len=1000)["kv_cache"]
    assert kv["bytes_per_token_per_layer"]["bf16"] == 2 * 8 * 128 * 2  # K and V, 8 kv heads of 128, 2 bytes
    assert kv["bytes_per_token"]["fp32"] == 32 * 2 * 8 * 128 * 4
    assert kv["bytes_at_seq_len"]["bf16"] == 1000 * 32 * 2 * 8 * 128 * 2
    ds_kv = memory(count_params(get_preset("deepseek-v3")))["kv_cache"]
    assert ds_kv["bytes_per_token_per_layer"]["bf16"] == (512 + 64) * 2  # MLA latent + shared rope key
    assert ds_kv["bytes_per_token"]["bf16"] == 61 * (512 + 64) * 2

    f1, f2 = flops_per_token(mix, 1024), flops_per_token(mix, 2048)
    assert f2["attention_scores"] == 2 * f1["attention_scores"] == 2 * 32 * 2 * 32 * (128 + 128) * 1024
    assert f1["moe"] == f1["router"] + f1["routed_experts"] + f1["shared_experts"]
    # without context, forward FLOPs are 2 per active weight, less lookups, norms and biases
    c = mix.components
    assert f1["total"] - f1["attention_scores"] == 2 * (mix.active_params - c["embeddings"].active - c["norms"].active)

    oss = count_params(get_preset("gpt-oss-20b"))  # half the layers see a 128-token window
    s1, s2 = flops_per_token(oss, 4096)["attention_scores"], flops_per_token(oss, 8192)["attention_scores"]
    per_full_layer = 2 * 64 * (64 + 64)
    assert s2 - s1 == 12 * per_full_layer * 4096
    assert memory(oss, 4096)["kv_cache"]["bytes_at_seq_len"]["bf16"] == 12 * (4096 + 128) * 2 * 8 * 64 * 2
    weights = memory(oss)["weights_bytes"]
    assert weights["bf16"] == 2 * oss.total_params and weights["int4"] == oss.total_params // 2


_MOEKIT_MOE: dict[str, Any] = {"d_model": 16, "d_hidden": 8, "num_experts": 4, "top_k": 2}
MOEKIT: list[dict[str, Any]] = [
    {"moe": _MOEKIT_MOE},
    {"n_kv_heads": 2, "tie_embeddings": False, "moe_every": 2, "first_dense_layers": 1, "dense_d_hidden": 24,
     "moe": {**_MOEKIT_MOE, "num_shared_experts": 2, "shared_d_hidden": 6, "shared_gate": True,
             "router": "sigmoid_bias"}},
    {"attn_bias": True, "qk_norm": True, "head_dim": 6,
     "moe": {**_MOEKIT_MOE, "activation": "gelu", "router": "noisy_topk", "num_shared_experts": 1}},
    {"dense": True, "moe": _MOEKIT_MOE},
    # the attention variants of the HF architectures moekit loads (OLMoE, Qwen) and Qwen's dense layers
    {"n_kv_heads": 2, "qk_norm": True, "qk_norm_scope": "full", "attn_bias": True, "attn_out_bias": True,
     "clip_qkv": 8.0, "dense_layers": [1, 2], "moe": _MOEKIT_MOE},
    {"qk_norm": True, "attn_out_bias": True, "head_dim": 6, "dense_layers": [0], "moe_every": 2, "moe": _MOEKIT_MOE},
    # multi-head latent attention (DeepSeek-V3), with and without the q LoRA; ERNIE's softmax scores
    {"mla": {"kv_lora_rank": 14, "qk_nope_head_dim": 6, "qk_rope_head_dim": 4, "v_head_dim": 8, "q_lora_rank": 10},
     "first_dense_layers": 1, "moe": {**_MOEKIT_MOE, "router": "sigmoid_bias", "score_func": "softmax",
                                      "num_shared_experts": 1}},
    {"mla": {"kv_lora_rank": 12, "qk_nope_head_dim": 0, "qk_rope_head_dim": 6, "v_head_dim": 5, "q_lora_rank": None},
     "tie_embeddings": False, "moe": {**_MOEKIT_MOE, "router": "sigmoid_bias", "n_group": 2, "topk_group": 1}},
]


@pytest.mark.parametrize("overrides", MOEKIT)
def test_moekit_run_config_matches_moekit_model(overrides: dict[str, Any]) -> None:
    """A run directory's config.json (ModelConfig.to_dict) against the MoETransformer it builds."""
    from moekit.model import ModelConfig

    _check_moekit_counts(ModelConfig(**{"vocab_size": 50, "d_model": 16, "n_layers": 4, "n_heads": 4, **overrides}))


@pytest.mark.parametrize("idx", [i for i, (m, _) in enumerate(TINY)
                                 if m in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "ernie4_5_moe", "deepseek_v3")])
def test_moekit_config_of_an_hf_model_matches_moekit_model(idx: int) -> None:
    """The ModelConfig moekit.hf makes of an HF config (MLA, q/k norm scope, o bias, dense_layers, score_func)
    and writes as a converted run's config.json, against the MoETransformer it builds."""
    from moekit.hf import config_from_hf

    model_type, kwargs = TINY[idx]
    hf = json.loads(transformers.AutoConfig.for_model(model_type, **kwargs).to_json_string())
    if hf.get("use_bias") or hf.get("attention_bias") and model_type == "deepseek_v3":
        # moekit refuses these (ERNIE's use_bias, DeepSeek's attention_bias) with an error naming the field
        with pytest.raises(ValueError, match="use_bias|attention_bias"):
            config_from_hf(hf)
        return
    _check_moekit_counts(config_from_hf(hf))


def _check_moekit_counts(cfg: Any) -> None:
    from moekit.model import MoETransformer

    with torch.device("meta"):
        model = MoETransformer(cfg)
    report = count_params(json.loads(json.dumps(cfg.to_dict())))
    tensors = dict(model.named_parameters()) | {n: b for n, b in model.named_buffers() if "expert_bias" in n}
    assert report.model_type == "moekit"
    assert report.num_moe_layers == sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    assert report.total_params == sum(p.numel() for p in tensors.values())
    k, e = cfg.moe.top_k, cfg.moe.num_experts
    assert report.active_params == pytest.approx(
        sum(p.numel() * (k / e if re.search(r"(^|\.)experts\.", n) else 1) for n, p in tensors.items()))


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"model_type='llama'.*mixtral.*deepseek_v3"):
        count_params({"model_type": "llama", "hidden_size": 8})
    broken = get_preset("qwen3-30b-a3b")
    del broken["moe_intermediate_size"]
    with pytest.raises(ValueError, match="qwen3_moe.*'moe_intermediate_size'"):
        count_params(broken)
    no_q = get_preset("deepseek-v3")
    del no_q["q_lora_rank"]
    with pytest.raises(ValueError, match="'q_lora_rank'"):
        count_params(no_q)
    with pytest.raises(ValueError, match="moekit.*'d_model'"):
        count_params({"vocab_size": 10})  # no model_type: moekit's own ModelConfig
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "ernie4_5_moe", "deepseek_v3"} <= set(SUPPORTED_MODEL_TYPES)


def test_cli_json_and_tables(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    assert main(["qwen3-30b-a3b", "--json", "--seq-len", "2048"]) == 0
    out = json.loads(capsys.readouterr().out)
    report = count_params(get_preset("qwen3-30b-a3b"))
    assert out["total_params"] == report.total_params and out["active_params"] == report.active_params
    assert out["active_params_no_embedding"] == report.active_params_no_embedding
    assert sum(c["total"] for c in out["components"].values()) == out["total_params"]
    assert sum(c["active"] for c in out["components"].values()) == out["active_params"]
    assert out["seq_len"] == 2048 and out["flops_per_token"]["total"] > 0
    assert set(out["memory"]) == {"fp32", "bf16", "int8", "int4"} and "bytes_per_token" in out["kv_cache"]

    (tmp_path / "config.json").write_text(json.dumps(get_preset("deepseek-v3")))
    assert main([str(tmp_path)]) == 0  # a directory holding an HF config.json
    text = capsys.readouterr().out
    assert "671.03B" in text and "37.55B" in text and "w/o input embedding" in text and "MLA" in text

    run = tmp_path / "run"  # a moekit run directory: ModelConfig.to_dict() as config.json
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model_type": "moekit", "vocab_size": 50, "d_model": 16,
                                                 "n_layers": 2, "n_heads": 4, "moe": _MOEKIT_MOE}))
    assert main([str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_type"] == "moekit"

    assert main(["no-such-model"]) == 2
    assert "presets: mixtral-8x7b" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main([str(tmp_path / "config.json"), "--json"]) == 2
    assert "bert" in capsys.readouterr().err


def test_jetmoe_published_names() -> None:
    """jetmoe/jetmoe-8b's config.json names the expert count, top-k and widths as the original code did;
    the spec reads them and counts what transformers builds from the same model under its own names."""
    published = {"model_type": "jetmoe", "vocab_size": 97, "n_embd": 24, "n_layer": 3, "num_key_value_heads": 2,
                 "kv_channels": 6, "ffn_hidden_size": 20, "moe_num_experts": 4, "moe_top_k": 2, "n_head": 4,
                 "n_positions": 64, "tie_word_embeddings": True}
    _, model = _build("jetmoe", {"vocab_size": 97, "hidden_size": 24, "num_hidden_layers": 3,
                                 "num_key_value_heads": 2, "kv_channels": 6, "intermediate_size": 20,
                                 "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 64})
    report = count_params(published)
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert (report.num_experts, report.experts_per_token) == (4, 2)
