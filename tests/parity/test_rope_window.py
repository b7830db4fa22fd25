"""RoPE scaling (linear, dynamic NTK, YaRN, Llama 3) and sliding-window attention on the Mixtral and Qwen
MoE families: windows shorter than the test sequences (and the window-trimmed KV cache), original contexts
shorter than them (so every scaling changes the frequencies the test positions use)."""

from __future__ import annotations

import pytest
import torch
from _hf_parity import COMMON, batch, build_hf, check_parity, moekit_greedy, transformers

from moekit.hf import from_pretrained
from moekit.nn.attention import KVCache

MIXTRAL = {"num_local_experts": 4, "num_experts_per_tok": 2}
QWEN2 = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
         "shared_expert_intermediate_size": 40}
QWEN3 = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24}
CASES = {
    "mixtral_window4_linear": ("MixtralConfig", MIXTRAL, {
        "sliding_window": 4, "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}}),
    # max_position_embeddings 16 < the 29 positions generated: the base grows during decoding
    "mixtral_dynamic_ntk": ("MixtralConfig", MIXTRAL, {
        "max_position_embeddings": 16, "head_dim": 12,  # transformers reads head_dim unguarded here
        "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}),
    "qwen2_window5_first_layers_llama3": ("Qwen2MoeConfig", QWEN2, {
        "use_sliding_window": True, "sliding_window": 5, "max_window_layers": 2,
        "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 16, "rope_theta": 5e5}}),
    # Qwen3's published YaRN scaling (factor 4), its original context shortened
    "qwen3_window3_yarn": ("Qwen3MoeConfig", QWEN3, {
        "use_sliding_window": True, "sliding_window": 3,
        "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                            "rope_theta": 1e6}}),
}


@pytest.mark.parametrize("case", CASES)
def test_rope_scaling_and_window_parity(case, tmp_path):
    cls, base, extra = CASES[case]
    check_parity(getattr(transformers, cls)(**{**COMMON, **base, **extra}), tmp_path, f"rope_window[{case}]")


def test_window_trims_the_cache(tmp_path):
    """Sliding layers keep window - 1 keys, full layers all of them; the tokens equal an untrimmed cache's."""
    cfg = transformers.Qwen2MoeConfig(**{**COMMON, **QWEN2, **CASES["qwen2_window5_first_layers_llama3"][2]})
    build_hf(cfg, tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")
    assert [b.window for b in model.layers] == [5, None, None]  # odd layers and layers >= 2 are full
    ids, mask = batch(cfg.vocab_size, 1)
    cache = model.new_kv_cache()
    with torch.no_grad():
        model(ids, attention_mask=mask, kv_cache=cache)
    assert [k.shape[2] for k in cache.k] == [4, 9, 9] and cache.length == 9
    trimmed = moekit_greedy(model, ids, mask)
    model.new_kv_cache = lambda: KVCache(model.config.n_layers)  # every key kept
    assert torch.equal(moekit_greedy(model, ids, mask), trimmed)
