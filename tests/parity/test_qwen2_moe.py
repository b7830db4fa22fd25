"""Qwen2-MoE parity: gated shared expert, qkv bias, decoder_sparse_step / mlp_only_layers, norm_topk_prob."""

from __future__ import annotations

import pytest
from _hf_parity import COMMON, check_parity, transformers

BASE = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 24,
    "shared_expert_intermediate_size": 40,
}
CASES = {
    # layer 1 MoE, layers 0 and 2 dense; raw top-k weights (the Qwen default)
    "sparse_step2_raw_topk": {"decoder_sparse_step": 2, "norm_topk_prob": False, "qkv_bias": True},
    # layer 0 dense by mlp_only_layers; renormalised top-3 of 8; tied head; no qkv bias
    "mlp_only_norm_topk_tied": {
        "num_experts": 8,
        "num_experts_per_tok": 3,
        "mlp_only_layers": [0],
        "norm_topk_prob": True,
        "tie_word_embeddings": True,
        "qkv_bias": False,
    },
}


@pytest.mark.parametrize("case", CASES)
def test_qwen2_moe_parity(case, tmp_path):
    cfg = transformers.Qwen2MoeConfig(**{**COMMON, **BASE, **CASES[case]})
    check_parity(cfg, tmp_path, f"qwen2_moe[{case}]")
