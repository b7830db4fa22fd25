"""The bytes of weights a decode step reads per token, counted by hand, and the threads it leads to."""
from __future__ import annotations

import torch

from moekit.config import ModelConfig, MoEConfig
from moekit.infer.load import choose_decode_threads, weight_bytes_per_token
from moekit.nn.transformer import MoETransformer


def _model(dtype=torch.float32) -> MoETransformer:
    moe = MoEConfig(d_model=32, d_hidden=48, num_experts=6, top_k=2)
    cfg = ModelConfig(vocab_size=100, d_model=32, n_layers=3, n_heads=4, max_seq_len=64, moe=moe,
                      first_dense_layers=1, dense_d_hidden=40)
    return MoETransformer(cfg).to(dtype)


def test_weight_bytes_per_token_counts_non_experts_and_top_k_experts():
    for dtype, item in ((torch.float32, 4), (torch.bfloat16, 2)):
        m = _model(dtype)
        D, V = 32, 100
        attn = 4 * D * D  # q, k, v, o (4 heads of 8, as many kv heads)
        norms = 2 * D
        dense_ffn = 3 * D * 40
        router = 6 * D
        top_k_experts = 2 * 3 * D * 48
        expected = (V * D + D  # tied embedding and the final norm
                    + 3 * (attn + norms)
                    + dense_ffn
                    + 2 * (router + top_k_experts)) * item
        assert weight_bytes_per_token(m) == expected
        assert choose_decode_threads(m) == 1
