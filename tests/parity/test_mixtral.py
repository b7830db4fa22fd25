"""Mixtral parity: softmax top-k renormalised; GQA; tied and untied heads; the fused expert layout."""

from __future__ import annotations

import pytest
from _hf_parity import COMMON, check_parity, transformers

CASES = {
    "gqa_e4_k2": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "tied_e8_k3_headdim": {
        "num_local_experts": 8,
        "num_experts_per_tok": 3,
        "tie_word_embeddings": True,
        "head_dim": 16,
        "num_key_value_heads": 4,
        "rope_theta": 500.0,
    },
}


@pytest.mark.parametrize("case", CASES)
def test_mixtral_parity(case, tmp_path):
    cfg = transformers.MixtralConfig(**{**COMMON, **CASES[case]})
    check_parity(cfg, tmp_path, f"mixtral[{case}]")
