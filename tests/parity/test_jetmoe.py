"""JetMoE parity: the mixture of attention heads (per-expert q and o projections, shared keys and values,
an output bias), the MLP experts fused as input_linear / output_linear with an output bias; and the
published config.json's own field names."""

from __future__ import annotations

import json

import pytest
from _hf_parity import COMMON, check_parity, transformers

from moekit.hf import config_from_hf

BASE = {k: v for k, v in COMMON.items() if k not in ("num_attention_heads", "intermediate_size")}
CASES = {
    "e4_k2_kv2_tied": {"num_local_experts": 4, "num_experts_per_tok": 2, "num_key_value_heads": 2,
                       "kv_channels": 8, "intermediate_size": 40},
    "e8_k3_kv1_untied": {"num_local_experts": 8, "num_experts_per_tok": 3, "num_key_value_heads": 1,
                         "kv_channels": 16, "intermediate_size": 24, "tie_word_embeddings": False},
}


@pytest.mark.parametrize("case", CASES)
def test_jetmoe_parity(case, tmp_path):
    cfg = transformers.JetMoeConfig(**{**BASE, **CASES[case]})
    check_parity(cfg, tmp_path, f"jetmoe[{case}]")


def test_published_names_read_as_transformers_names():
    """jetmoe-8b's config.json: n_embd, n_layer, n_positions, moe_num_experts, moe_top_k, ffn_hidden_size."""
    hf = json.loads(transformers.JetMoeConfig(**{**BASE, **CASES["e8_k3_kv1_untied"]}).to_json_string())
    published = {k: v for k, v in hf.items() if k not in (
        "hidden_size", "num_hidden_layers", "max_position_embeddings", "num_local_experts",
        "num_experts_per_tok", "intermediate_size", "num_attention_heads")}
    published |= {"n_embd": hf["hidden_size"], "n_layer": hf["num_hidden_layers"],
                  "n_positions": hf["max_position_embeddings"], "moe_num_experts": hf["num_local_experts"],
                  "moe_top_k": hf["num_experts_per_tok"], "ffn_hidden_size": hf["intermediate_size"]}
    assert config_from_hf(published) == config_from_hf(hf)
