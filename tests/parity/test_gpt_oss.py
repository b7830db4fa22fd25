"""gpt-oss parity: router and expert biases, the clamped SwiGLU, attention sinks, sliding-window layers
(windows shorter than the test sequences, and the window-trimmed KV cache), YaRN RoPE."""

from __future__ import annotations

import pytest
from _hf_parity import COMMON, check_parity, transformers

BASE = {
    "head_dim": 12,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "intermediate_size": 32,
    # the published scaling with its original context shortened below the test sequences
    "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                        "truncate": False, "original_max_position_embeddings": 8, "rope_theta": 150000.0},
}
CASES = {
    # gpt-oss's own pattern: sliding, full, sliding; a window of 4 < the 9-token prompts
    "alternating_window4_yarn": {"sliding_window": 4},
    "all_sliding_window6_k3_tied": {
        "sliding_window": 6,
        "layer_types": ["sliding_attention"] * 3,
        "num_experts_per_tok": 3,
        "swiglu_limit": 1.5,
        "tie_word_embeddings": True,
    },
    "full_plain_rope_no_attn_bias": {
        "layer_types": ["full_attention"] * 3,
        "attention_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "swiglu_alpha": 1.0,
    },
}


@pytest.mark.parametrize("case", CASES)
def test_gpt_oss_parity(case, tmp_path):
    cfg = transformers.GptOssConfig(**{**COMMON, **BASE, **CASES[case]})
    check_parity(cfg, tmp_path, f"gpt_oss[{case}]")
