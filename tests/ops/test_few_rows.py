"""Decode-size calls without autograd take the host-planned path: at batch 1 its bits equal the fused op's;
with several tokens it agrees to rounding (the offloaded experts run the same path, so offloaded ==
resident stays exact either way)."""
from __future__ import annotations

import pytest
import torch

from moekit.ops.grouped_ffn import FEW_ASSIGNMENTS, _GroupedFFN, grouped_ffn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H", [24, 48, 64])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_few_rows_path_matches_the_fused_op(dtype, H, activation):
    g = torch.Generator().manual_seed(H)
    E, D = 6, 32
    w_gate = torch.randn(E, H, D, generator=g).to(dtype) if activation == "swiglu" else None
    w_up, w_down = torch.randn(E, H, D, generator=g).to(dtype), torch.randn(E, D, H, generator=g).to(dtype)
    for T, K in ((1, 2), (4, 2), (8, 2), (3, 4)):
        assert T * K <= FEW_ASSIGNMENTS
        x = torch.randn(T, D, generator=g).to(dtype)
        token = torch.arange(T).repeat_interleave(K)
        expert = torch.randint(0, E + 1, (T * K,), generator=g)  # E = dropped by a capacity limit
        expert[0] = 1  # at least one kept
        weight = torch.rand(T * K, generator=g)
        with torch.no_grad():
            fast = grouped_ffn(x, token, expert, weight, w_gate, w_up, w_down, activation)
            fused = _GroupedFFN.apply(x, token, expert, weight, w_gate, w_up, w_down, activation)
        if T == 1:  # one row per expert: the same GEMMs and the same additions
            assert torch.equal(fast, fused), (K, (fast.float() - fused.float()).abs().max())
        else:
            torch.testing.assert_close(fast, fused, rtol=1e-5 if dtype == torch.float32 else 2e-2,
                                       atol=1e-4 * fused.abs().max().item() if dtype == torch.float32 else 2.0)
        # an independent reference: each kept assignment's expert, weighted, summed per token in float64
        ref = torch.zeros(T, D, dtype=torch.float64)
        for a in range(T * K):
            e = int(expert[a])
            if e == E:
                continue
            xa = x[token[a]].double()
            u = w_up[e].double() @ xa
            h = torch.nn.functional.silu(w_gate[e].double() @ xa) * u if w_gate is not None else \
                torch.nn.functional.gelu(u)
            ref[token[a]] += weight[a].double() * (w_down[e].double() @ h)
        tol = 1e-4 if dtype == torch.float32 else 6e-2
        torch.testing.assert_close(fast.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_calls_that_need_gradients_keep_the_fused_op():
    x = torch.randn(1, 8, requires_grad=True)
    w = [torch.randn(3, 16, 8, requires_grad=True), torch.randn(3, 16, 8), torch.randn(3, 8, 16)]
    out = grouped_ffn(x, torch.tensor([0, 0]), torch.tensor([0, 2]), torch.tensor([0.5, 0.5]), *w, "swiglu")
    assert out.grad_fn is not None and "GroupedFFN" in type(out.grad_fn).__name__
