"""DeepSeek-V2 parity: multi-head latent attention (with and without q LoRA), softmax routing not
renormalised, routed_scaling_factor, topk_method greedy and group_limited_greedy (groups scored by
their best expert), shared experts, first_k_dense_replace, tied and untied heads."""

from __future__ import annotations

import json

import pytest
from _hf_parity import COMMON, batch, build_hf, check_parity, hf_logits, max_diff, moekit_logits, transformers

from moekit.hf import from_pretrained

BASE = {
    "num_key_value_heads": 4,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 24,
    "kv_lora_rank": 16,
    "q_lora_rank": 24,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 12,
    "n_shared_experts": 2,
}
CASES = {
    # V2-Lite's shape: greedy top-k, q projected directly, one dense layer first
    "greedy_no_qlora_dense1": {
        "topk_method": "greedy",
        "q_lora_rank": None,
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 1.0,
    },
    # V2's shape: group-limited greedy with q LoRA, scaled weights
    "group_limited_g4_top2_k3_scaled": {
        "topk_method": "group_limited_greedy",
        "n_group": 4,
        "topk_group": 2,
        "num_experts_per_tok": 3,
        "routed_scaling_factor": 16.0,
        "first_k_dense_replace": 0,
        "n_shared_experts": 1,
    },
    "group_limited_g2_top1_tied": {
        "topk_method": "group_limited_greedy",
        "n_group": 2,
        "topk_group": 1,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 2,
        "tie_word_embeddings": True,
    },
    # V2-Lite's published rope_scaling (legacy "type" key; YaRN scales the softmax by mscale**2)
    "yarn_published": {
        "q_lora_rank": None,
        "first_k_dense_replace": 1,
        "rope_scaling": {"type": "yarn", "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1},
    },
    # an original context shorter than the test sequences, and mscale != mscale_all_dim (cos, sin scaled)
    "yarn_short_context_group_limited": {
        "topk_method": "group_limited_greedy",
        "n_group": 2,
        "topk_group": 1,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                         "original_max_position_embeddings": 8, "beta_fast": 8, "beta_slow": 1},
    },
}


@pytest.mark.parametrize("case", CASES)
def test_deepseek_v2_parity(case, tmp_path):
    cfg = transformers.DeepseekV2Config(**{**COMMON, **BASE, **CASES[case]})
    check_parity(cfg, tmp_path, f"deepseek_v2[{case}]")


def test_group_limit_changes_the_routing(tmp_path):
    """The group-limited cases above would pass with groups ignored if no token's greedy pick fell outside
    its best groups: checked here, by reading the same checkpoint as greedy."""
    case = CASES["group_limited_g4_top2_k3_scaled"]
    ref = build_hf(transformers.DeepseekV2Config(**{**COMMON, **BASE, **case}), tmp_path / "hf")
    cfg_file = tmp_path / "hf" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "topk_method": "greedy"}))
    ids, mask = batch(COMMON["vocab_size"], 1)
    greedy = moekit_logits(from_pretrained(tmp_path / "hf"), ids, mask)
    assert max_diff(greedy, hf_logits(ref, ids, mask), mask) > 1e-2
