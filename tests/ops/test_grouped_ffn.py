"""The fused grouped-FFN op against the readable loop, on a size with many rows per expert."""
from __future__ import annotations

import pytest
import torch

from moekit.functional.dispatch import loop_experts_reference, sort_by_expert
from moekit.ops.grouped_ffn import _runs, grouped_ffn_combine


def test_runs_skip_empty_experts_and_cover_all_rows():
    assert _runs([3, 0, 2, 0, 5]) == [(0, slice(0, 3)), (2, slice(3, 5)), (4, slice(5, 10))]


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
def test_fused_op_matches_loop_with_empty_experts(activation):
    """Experts 1 and 5 get no rows: their weight gradients must be exactly zero, not garbage."""
    g = torch.Generator().manual_seed(0)
    T, D, H, E, A = 300, 12, 20, 6, 700
    x = torch.randn(T, D, dtype=torch.float64, generator=g, requires_grad=True)
    ws = [torch.randn(E, H, D, dtype=torch.float64, generator=g) if activation == "swiglu" else None,
          torch.randn(E, H, D, dtype=torch.float64, generator=g), torch.randn(E, D, H, dtype=torch.float64, generator=g)]
    ws = [w.requires_grad_(True) if w is not None else None for w in ws]
    token = torch.randint(0, T, (A,), generator=g)
    expert = torch.tensor([0, 2, 3, 4])[torch.randint(0, 4, (A,), generator=g)]
    weight = torch.rand(A, dtype=torch.float64, generator=g, requires_grad=True)
    d = sort_by_expert(token, expert, weight, E)
    out = grouped_ffn_combine(x, d.token_A, d.weight_A, *ws, d.counts, activation)
    ref = loop_experts_reference(x, token, expert, weight, *ws, activation)
    torch.testing.assert_close(out, ref)
    leaves = [t for t in (x, weight, *ws) if t is not None]
    gy = torch.randn(T, D, dtype=torch.float64, generator=g)
    got = torch.autograd.grad(out, leaves, gy)
    want = torch.autograd.grad(ref, leaves, gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    for gw in got[2:]:
        assert torch.equal(gw[1], torch.zeros_like(gw[1])) and torch.equal(gw[5], torch.zeros_like(gw[5]))
