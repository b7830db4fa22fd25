"""DeepSeek-V3 parity: multi-head latent attention (with and without q LoRA, interleaved RoPE or not),
sigmoid routing with the correction bias, group-limited top-k, routed_scaling_factor, shared experts,
first_k_dense_replace."""

from __future__ import annotations

import pytest
from _hf_parity import COMMON, check_parity, transformers

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
}
CASES = {
    "groups2_dense1_interleave": {
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "n_shared_experts": 1,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "rope_interleave": True,
    },
    # K/M = 4: HF still scores a group by its two best experts (moekit's group_score_top=2, not ceil(K/M))
    "groups2_top1_k4": {
        "n_group": 2,
        "topk_group": 1,
        "num_experts_per_tok": 4,
        "first_k_dense_replace": 0,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
    },
    "groups4_top2_k3": {
        "n_group": 4,
        "topk_group": 2,
        "num_experts_per_tok": 3,
        "first_k_dense_replace": 2,
        "n_shared_experts": 2,
        "routed_scaling_factor": 1.5,
        "norm_topk_prob": True,
    },
    # q projected directly (no q LoRA), rotate-half RoPE, raw sigmoid weights, no groups, tied head
    "no_qlora_half_rope_raw_tied": {
        "q_lora_rank": None,
        "rope_interleave": False,
        "norm_topk_prob": False,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 0,
        "n_shared_experts": 1,
        "routed_scaling_factor": 1.0,
        "tie_word_embeddings": True,
    },
    # DeepSeek-V3's published rope_scaling, its original context shortened below the test sequences
    "yarn_published_style": {
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "rope_scaling": {"type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 8, "beta_fast": 32, "beta_slow": 1},
    },
}


@pytest.mark.parametrize("case", CASES)
def test_deepseek_v3_parity(case, tmp_path):
    cfg = transformers.DeepseekV3Config(**{**COMMON, **BASE, **CASES[case]})
    check_parity(cfg, tmp_path, f"deepseek_v3[{case}]")
