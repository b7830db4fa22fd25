"""GraniteMoE parity: its embedding / residual / attention / logits multipliers, fused input_linear /
output_linear experts, attention biases, tied and untied heads."""

from __future__ import annotations

import pytest
from _hf_parity import COMMON, check_parity, transformers

BASE = {"num_local_experts": 4, "num_experts_per_tok": 2}
CASES = {
    # granite-3.0-1b-a400m's multipliers
    "published_multipliers_tied": {
        "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0625,
        "logits_scaling": 6.0, "tie_word_embeddings": True,
    },
    "bias_e8_k3_untied": {
        "num_local_experts": 8, "num_experts_per_tok": 3, "attention_bias": True, "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5, "attention_multiplier": 0.2, "logits_scaling": 2.0,
    },
}


@pytest.mark.parametrize("case", CASES)
def test_granitemoe_parity(case, tmp_path):
    cfg = transformers.GraniteMoeConfig(**{**COMMON, **BASE, **CASES[case]})
    check_parity(cfg, tmp_path, f"granitemoe[{case}]")
