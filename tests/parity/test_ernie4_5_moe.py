"""ERNIE 4.5 MoE parity: softmax routing chosen with e_score_correction_bias, shared experts, MoE layer
range (start / end / interval), interleaved RoPE (permuted into moekit's layout and back)."""

from __future__ import annotations

import pytest
from _hf_parity import COMMON, check_parity, transformers

BASE = {"moe_num_experts": 6, "moe_k": 2, "moe_intermediate_size": 24}
CASES = {
    # layer 0 dense, 1-2 MoE; one shared expert; tied head (the ERNIE default)
    "shared1_start1_tied": {
        "moe_num_shared_experts": 1,
        "moe_layer_start_index": 1,
        "tie_word_embeddings": True,
    },
    # layers 0-1 MoE, layer 2 dense (end index); two shared experts; top-3 of 8; untied
    "shared2_end1_untied": {
        "moe_num_experts": 8,
        "moe_k": 3,
        "moe_num_shared_experts": 2,
        "moe_layer_start_index": 0,
        "moe_layer_end_index": 1,
        "tie_word_embeddings": False,
    },
    "no_shared_interval2": {"moe_num_shared_experts": 0, "moe_layer_start_index": 0, "moe_layer_interval": 2},
}


@pytest.mark.parametrize("case", CASES)
def test_ernie4_5_moe_parity(case, tmp_path):
    cfg = transformers.Ernie4_5_MoeConfig(**{**COMMON, **BASE, **CASES[case]})
    check_parity(cfg, tmp_path, f"ernie4_5_moe[{case}]")
