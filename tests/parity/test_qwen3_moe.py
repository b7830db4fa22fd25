"""Qwen3-MoE parity: per-head q/k RMSNorm, attention_bias (q/k/v/o), mlp_only_layers, norm_topk_prob."""

from __future__ import annotations

import pytest
from _hf_parity import COMMON, check_parity, transformers

BASE = {"num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 24}
CASES = {
    "norm_topk_mlp_only": {"norm_topk_prob": True, "mlp_only_layers": [1]},
    # explicit head_dim != hidden / heads, biases everywhere, layer 1 the only MoE layer, raw top-k
    "bias_headdim_sparse_step2": {
        "attention_bias": True,
        "head_dim": 16,
        "decoder_sparse_step": 2,
        "norm_topk_prob": False,
    },
}


@pytest.mark.parametrize("case", CASES)
def test_qwen3_moe_parity(case, tmp_path):
    cfg = transformers.Qwen3MoeConfig(**{**COMMON, **BASE, **CASES[case]})
    check_parity(cfg, tmp_path, f"qwen3_moe[{case}]")
