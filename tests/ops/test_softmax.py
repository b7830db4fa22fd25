"""The router softmax over a short last dimension: aten's values and gradients, to rounding."""
from __future__ import annotations

import pytest
import torch

from moekit.ops.softmax import SHORT_ROW, router_softmax


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
    z = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(router_softmax, (z,))


def test_leading_dims_masked_experts_and_nan_rows():
    z = torch.randn(2, 3, 8)
    torch.testing.assert_close(router_softmax(z), z.softmax(-1), rtol=1e-6, atol=1e-7)
    z = torch.randn(4, 8)
    z[:, 5] = float("-inf")  # an expert never chosen: probability exactly 0, gradient finite
    zr = z.clone().requires_grad_()
    p = router_softmax(zr)
    p.sum().backward()
    assert torch.equal(p[:, 5], torch.zeros(4)) and torch.isfinite(zr.grad).all()
    z[1, 2] = float("nan")  # a NaN token stays NaN, the others are untouched
    p = router_softmax(z)
    assert torch.isnan(p[1]).all() and torch.isfinite(p[[0, 2, 3]]).all()
    assert router_softmax(torch.empty(0, 8)).shape == (0, 8)


def test_the_default_router_uses_it():
    from moekit import MoEConfig
    from moekit.nn.router import Router

    router = Router(MoEConfig(d_model=16, d_hidden=32, num_experts=8, top_k=2, router="topk"))
    x = torch.randn(50, 16)
    r = router(x)
    torch.testing.assert_close(r.probs_TE, r.logits_TE.softmax(-1), rtol=1e-6, atol=1e-7)
    assert r.probs_TE.grad_fn is not None and "ShortSoftmax" in type(r.probs_TE.grad_fn).__name__
