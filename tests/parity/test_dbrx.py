"""DBRX parity: fused Wqkv clamped by clip_qkv, bias-free LayerNorms, w1 / v1 / w2 experts stacked by row,
softmax top-k renormalised (moe_normalize_expert_weights 1) or raw (null), GQA."""

from __future__ import annotations

import pytest
from _hf_parity import COMMON, check_parity, transformers

BASE = {"vocab_size": COMMON["vocab_size"], "d_model": 48, "n_heads": 4, "n_layers": 3, "max_seq_len": 128,
        "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None}
CASES = {
    "clip_gqa_e4_k2": ({"kv_n_heads": 2, "clip_qkv": 0.5, "rope_theta": 1e4},
                       {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2}),
    # (transformers 5.24 cannot run clip_qkv=None: its clamp gets no bound)
    "raw_weights_e8_k3": ({"kv_n_heads": 4, "clip_qkv": 8.0, "rope_theta": 5e5},
                               {"ffn_hidden_size": 24, "moe_num_experts": 8, "moe_top_k": 3,
                                "moe_normalize_expert_weights": None}),
}


@pytest.mark.parametrize("case", CASES)
def test_dbrx_parity(case, tmp_path):
    attn, ffn = CASES[case]
    cfg = transformers.DbrxConfig(**BASE, attn_config=attn, ffn_config=ffn)
    check_parity(cfg, tmp_path, f"dbrx[{case}]")
