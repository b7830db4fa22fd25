"""OLMoE parity: q/k RMSNorm over the full projection width, clip_qkv, attention_bias, no renormalisation."""

from __future__ import annotations

import pytest
from _hf_parity import COMMON, check_parity, transformers

BASE = {"num_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 24}
CASES = {
    "raw_topk": {"norm_topk_prob": False},
    "clip_bias_norm_topk_tied": {
        "clip_qkv": 0.6,
        "attention_bias": True,
        "norm_topk_prob": True,
        "num_experts_per_tok": 3,
        "tie_word_embeddings": True,
    },
}


@pytest.mark.parametrize("case", CASES)
def test_olmoe_parity(case, tmp_path):
    cfg = transformers.OlmoeConfig(**{**COMMON, **BASE, **CASES[case]})
    check_parity(cfg, tmp_path, f"olmoe[{case}]")
