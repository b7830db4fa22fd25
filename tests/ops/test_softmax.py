"""The router softmax over a short last dimension: aten's values and gradients, to rounding."""
from __future__ import annotations

import pytest
import torch

from moekit.ops.softmax import MIN_ROWS, SHORT_ROW, router_softmax


def _kernel(p: torch.Tensor) -> str:
    return type(p.grad_fn).__name__


@pytest.mark.parametrize("experts", [1, 2, 7, 8, SHORT_ROW - 1, SHORT_ROW, 64])
def test_values_and_gradients_match_aten(experts):
    torch.manual_seed(experts)
    z = (torch.randn(300, experts) * 4).requires_grad_()
    g = torch.randn(300, experts)
    p = router_softmax(z)
    (dz,) = torch.autograd.grad(p, z, g)
    ref = z.detach().clone().requires_grad_()
    p_ref = ref.softmax(dim=-1)
    (dz_ref,) = torch.autograd.grad(p_ref, ref, g)
    torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dz, dz_ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(p.sum(-1), torch.ones(300))


def test_gradcheck_float64():
    z = torch.randn(MIN_ROWS, 4, dtype=torch.float64, requires_grad=True)
    assert "ShortSoftmax" in _kernel(router_softmax(z))
    assert torch.autograd.gradcheck(router_softmax, (z,))


def test_short_rows_only_for_enough_rows():
    # a decode step's few rows keep aten's kernel (a Function call would cost more than it saves)
    few = router_softmax(torch.randn(MIN_ROWS - 1, 8, requires_grad=True))
    many = router_softmax(torch.randn(MIN_ROWS, 8, requires_grad=True))
    wide = router_softmax(torch.randn(MIN_ROWS, SHORT_ROW, requires_grad=True))
    assert "ShortSoftmax" in _kernel(many) and "ShortSoftmax" not in _kernel(few) + _kernel(wide)


def test_leading_dims_masked_experts_and_nan_rows():
    z = torch.randn(2, 3 * MIN_ROWS, 8)
    torch.testing.assert_close(router_softmax(z), z.softmax(-1), rtol=1e-6, atol=1e-7)
    z = torch.randn(MIN_ROWS, 8)
    z[:, 5] = float("-inf")  # an expert never chosen: probability exactly 0, gradient finite
    zr = z.clone().requires_grad_()
    p = router_softmax(zr)
    p.sum().backward()
    assert "ShortSoftmax" in _kernel(p)
    assert torch.equal(p[:, 5], torch.zeros(MIN_ROWS)) and torch.isfinite(zr.grad).all()
    z[1, 2] = float("nan")  # a NaN token stays NaN, the others are untouched
    p = router_softmax(z)
    assert torch.isnan(p[1]).all() and torch.isfinite(p[0]).all() and torch.isfinite(p[2:]).all()
    assert router_softmax(torch.empty(0, 8)).shape == (0, 8)


def test_the_default_router_uses_it():
    from moekit import MoEConfig
    from moekit.nn.router import Router

    router = Router(MoEConfig(d_model=16, d_hidden=32, num_experts=8, top_k=2, router="topk"))
    x = torch.randn(MIN_ROWS, 16)
    r = router(x)
    torch.testing.assert_close(r.probs_TE, r.logits_TE.softmax(-1), rtol=1e-6, atol=1e-7)
    assert "ShortSoftmax" in _kernel(r.probs_TE)
