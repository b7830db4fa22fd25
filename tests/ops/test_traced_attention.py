"""The traced attention of compiled decode graphs (:func:`moekit.ops.attention.traced_attention`) against
``scaled_dot_product_attention`` and against the softmax with sinks worked out in plain loops."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit.ops.attention import TRACED_MAX_QUERIES, traced_attention, traces_attention


def _inputs(B, H, Hk, S, L, d=8, seed=0, per_head=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=g) for shape in ((B, H, S, d), (B, Hk, L, d), (B, Hk, L, d)))
    mask = torch.rand(B, H if per_head else 1, S, L, generator=g) > 0.4
    mask[..., 0] = True  # every query sees a key
    return q, k, v, mask


@pytest.mark.parametrize("shape", [(4, 4, 4, 1, 37), (1, 8, 2, 5, 20), (3, 6, 3, 16, 40)])
@pytest.mark.parametrize("per_head", [False, True])
def test_equals_sdpa(shape, per_head):
    q, k, v, mask = _inputs(*shape, per_head=per_head)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=0.4)
    torch.testing.assert_close(traced_attention(q, k, v, mask, 0.4), want, atol=1e-6, rtol=1e-5)
    compiled = torch.compile(traced_attention, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(q, k, v, mask, 0.4), want, atol=1e-6, rtol=1e-5)


def test_sinks_by_hand():
    """Each query's weights: exp(score) / (sum of exp(admitted scores) + exp(sink)), no value for the sink."""
    q, k, v, mask = _inputs(2, 4, 2, 3, 6, d=4, seed=3)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    got = traced_attention(q, k, v, mask, None, sinks)
    want = torch.zeros_like(got)
    for b in range(2):
        for h in range(4):
            kv = h // 2
            for s in range(3):
                scores = [float(q[b, h, s] @ k[b, kv, j]) / math.sqrt(4) for j in range(6)]
                w = [math.exp(x) if mask[b, 0, s, j] else 0.0 for j, x in enumerate(scores)]
                total = sum(w) + math.exp(float(sinks[h]))
                want[b, h, s] = sum(w[j] / total * v[b, kv, j] for j in range(6))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_bf16_sums_in_fp32():
    q, k, v, mask = (t.bfloat16() if t.is_floating_point() else t for t in _inputs(2, 4, 4, 2, 64))
    got = traced_attention(q, k, v, mask)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=0)  # one bf16 rounding of the result


def test_taken_only_inside_a_compiled_graph_for_a_few_queries():
    q, k, _, mask = _inputs(1, 2, 2, 4, 9)
    assert not traces_attention(q, k, mask)  # eager: the fused kernel
    seen = []

    def probe(q, k, mask):
        seen.append(traces_attention(q, k, mask))
        return q.sum()

    fn = torch.compile(probe, fullgraph=True, dynamic=False)
    fn(q, k, mask)
    long_q = torch.zeros(1, 2, TRACED_MAX_QUERIES + 1, 8)
    fn(long_q, k, torch.ones(1, 1, TRACED_MAX_QUERIES + 1, 9, dtype=torch.bool))
    fn(q, k, None)
    with torch.enable_grad():
        fn(q.requires_grad_(), k, mask)
    assert seen == [True, False, False, False]


def test_values_with_their_own_head_dim():
    """MLA's values are narrower than its queries and keys."""
    q, k, _, mask = _inputs(2, 4, 4, 3, 11, d=12)
    v = torch.randn(2, 4, 11, 5)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(traced_attention(q, k, v, mask), want, atol=1e-6, rtol=1e-5)
