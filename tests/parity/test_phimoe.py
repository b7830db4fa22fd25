"""PhiMoE parity: SparseMixer routing (two picks, each weighted within its relative-eps neighbourhood),
LayerNorms with biases, attention and head biases, a sliding window shorter than the test sequences,
Phi-3.5-MoE's longrope scaling."""

from __future__ import annotations

import pytest
from _hf_parity import COMMON, check_parity, transformers

BASE = {"num_local_experts": 4, "num_experts_per_tok": 2}
CASES = {
    # a wide eps: most tokens weight each pick among several experts
    "eps0.3_biases_window5": {"router_jitter_noise": 0.3, "attention_bias": True, "lm_head_bias": True,
                              "sliding_window": 5},
    # Phi-3.5-MoE's eps; 8 experts; tied head
    "eps0.01_e8_tied": {"num_local_experts": 8, "router_jitter_noise": 0.01, "tie_word_embeddings": True},
    # Phi-3.5-MoE's longrope (its short factors within the original context, both mscales 1.2431); past
    # the original context transformers keeps the short factors where Phi's code and moekit switch
    "longrope_published_style": {"rope_parameters": {
        "rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 64,
        "short_factor": [1.0, 1.1, 1.3, 1.9, 3.2, 5.0], "long_factor": [1.1, 1.5, 2.6, 7.0, 16.0, 30.0],
        "short_mscale": 1.243163121016122, "long_mscale": 1.243163121016122}},
}


@pytest.mark.parametrize("case", CASES)
def test_phimoe_parity(case, tmp_path):
    cfg = transformers.PhimoeConfig(**{**COMMON, **BASE, **CASES[case]})
    check_parity(cfg, tmp_path, f"phimoe[{case}]")
