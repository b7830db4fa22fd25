"""`moekit convert` HF -> moekit run directory -> HF for the architectures added with DeepSeek-V2: the same
architecture and config, every tensor back bit-exact (interleaved RoPE rows, gpt-oss's interleaved experts,
the fused experts of Granite, JetMoE and DBRX, DBRX's Wqkv), and the run directory's model equal to
transformers'."""

from __future__ import annotations

import json

import pytest
import torch
from _hf_parity import COMMON, TOL, batch, build_hf, hf_logits, max_diff, moekit_logits, transformers
from safetensors.torch import load_file

from moekit.cli.main import main
from moekit.hf import config_from_hf, load_any

CASES = {
    "deepseek_v2": ("DeepseekV2Config", {
        "num_key_value_heads": 4, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
        "kv_lora_rank": 16, "q_lora_rank": None, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 12,
        "n_shared_experts": 2, "first_k_dense_replace": 1, "topk_method": "group_limited_greedy", "n_group": 4,
        "topk_group": 2, "routed_scaling_factor": 2.0,
        "rope_scaling": {"type": "yarn", "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 8, "beta_fast": 32, "beta_slow": 1}}),
    "gpt_oss": ("GptOssConfig", {
        "head_dim": 12, "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32,
        "sliding_window": 4, "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                 "beta_slow": 1.0, "truncate": False,
                                                 "original_max_position_embeddings": 8, "rope_theta": 150000.0}}),
    "granitemoe": ("GraniteMoeConfig", {
        "num_local_experts": 4, "num_experts_per_tok": 2, "embedding_multiplier": 12.0,
        "residual_multiplier": 0.22, "attention_multiplier": 0.0625, "logits_scaling": 6.0}),
    "dbrx": ("DbrxConfig", {
        "d_model": 48, "n_heads": 4, "n_layers": 2, "max_seq_len": 128,
        "attn_config": {"kv_n_heads": 2, "clip_qkv": 4.0, "rope_theta": 1e4},
        "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2}}),
    "phimoe": ("PhimoeConfig", {
        "num_local_experts": 4, "num_experts_per_tok": 2, "router_jitter_noise": 0.2, "attention_bias": True,
        "lm_head_bias": True, "sliding_window": 6}),
    "jetmoe": ("JetMoeConfig", {
        "num_local_experts": 4, "num_experts_per_tok": 2, "num_key_value_heads": 2, "kv_channels": 8,
        "intermediate_size": 40}),
}
SKIP_COMMON = {"dbrx": ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                        "intermediate_size", "max_position_embeddings"),
               "jetmoe": ("num_attention_heads",)}


@pytest.mark.parametrize("case", CASES)
def test_convert_round_trip(case, tmp_path):
    cls, kw = CASES[case]
    common = {k: v for k, v in COMMON.items() if k not in SKIP_COMMON.get(case, ())}
    ref = build_hf(getattr(transformers, cls)(**{**common, **kw}), tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    model, _ = load_any(tmp_path / "run")
    ids, mask = batch(COMMON["vocab_size"], 1)
    assert max_diff(moekit_logits(model, ids, mask), hf_logits(ref, ids, mask), mask) <= TOL
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "hf2")]) == 0
    src, out = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("hf", "hf2"))
    assert out["model_type"] == case
    original, back = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("hf", "hf2"))
    assert set(original) == set(back)
    for k, v in original.items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=0, msg=k)
    assert config_from_hf(out) == config_from_hf(src)  # the same model, RoPE scaling and windows included
