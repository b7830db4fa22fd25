"""Training-mode routing noise against a naive float64 loop given the same draws.

noisy_topk (Shazeer et al. 2017): l' = l + N(0,1) * softplus(x W_noise^T); picks = top-k of l'; weights =
softmax over the picked l'; P (balance loss) = softmax(l). Router jitter (Switch): the router input is
x * U(1-eps, 1+eps); the experts see the un-jittered x. Both draw from the generator passed to the layer,
in the order the Router documents (jitter over x first, then one normal per token and expert).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit import MoEConfig, MoELayer

T, D, H, E, K = 9, 6, 5, 4, 2


def _layer(router: str, jitter: float = 0.0, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(d_model=D, d_hidden=H, num_experts=E, top_k=K, router=router, router_jitter=jitter,
                               aux_loss_coef=0.0, z_loss_coef=0.0)).double()
    with torch.no_grad():  # a noise scale that moves picks: w_noise starts at 0
        if layer.router.w_noise is not None:
            layer.router.w_noise.normal_(0, 1.0)
        layer.router.weight.normal_(0, 0.5)
    return layer.train()


def _expert(layer: MoELayer, e: int, x: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    return (F.silu(x @ ex.w_gate[e].T) * (x @ ex.w_up[e].T)) @ ex.w_down[e].T


def naive(layer: MoELayer, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Token by token, with the draws made here from a generator seeded like the layer's."""
    cfg, g = layer.cfg, torch.Generator().manual_seed(seed)
    xr = x
    if cfg.router_jitter > 0:
        u = torch.empty(x.shape, dtype=x.dtype).uniform_(1 - cfg.router_jitter, 1 + cfg.router_jitter, generator=g)
        xr = x * u
    logits = xr @ layer.router.weight.T
    eps = None
    if cfg.router == "noisy_topk":
        eps = torch.randn(logits.shape, generator=g, dtype=logits.dtype)
    rows, picks = [], []
    for t in range(x.shape[0]):
        lt = logits[t]
        if eps is not None:
            lt = lt + eps[t] * F.softplus(xr[t] @ layer.router.w_noise.T)
        order = sorted(range(E), key=lambda e: -float(lt[e]))[:K]
        if cfg.router == "noisy_topk":
            w = torch.softmax(torch.stack([lt[e] for e in order]), 0)
        else:  # topk, renormalised
            p = torch.softmax(lt, 0)
            w = torch.stack([p[e] for e in order]) / sum(p[e] for e in order)
        rows.append(sum(w[i] * _expert(layer, e, x[t]) for i, e in enumerate(order)))  # experts see x, not xr
        picks.append(order)
    return torch.stack(rows), picks


def _grads(layer: MoELayer, x: torch.Tensor, y: torch.Tensor, gy: torch.Tensor):
    params = [p for p in layer.parameters() if p.requires_grad]
    return torch.autograd.grad((y * gy).sum(), [x, *params])


@pytest.mark.parametrize("router,jitter", [("noisy_topk", 0.0), ("topk", 0.3), ("noisy_topk", 0.3)])
def test_training_noise_matches_naive_loop_given_the_same_draws(router, jitter):
    layer = _layer(router, jitter)
    gen_x = torch.Generator().manual_seed(1)
    x = torch.randn(T, D, dtype=torch.float64, generator=gen_x, requires_grad=True)
    gy = torch.randn(T, D, dtype=torch.float64, generator=gen_x)
    out = layer(x, generator=torch.Generator().manual_seed(11))
    ref, picks = naive(layer, x, seed=11)
    torch.testing.assert_close(out.output, ref, rtol=1e-10, atol=1e-12)
    got, want = _grads(layer, x, out.output, gy), _grads(layer, x, ref, gy)
    names = ["x", *(n for n, p in layer.named_parameters() if p.requires_grad)]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)
    if router == "noisy_topk":  # W_noise is trained through the picked noisy logits
        w_noise_grad = got[names.index("router.w_noise")]
        assert w_noise_grad.abs().sum() > 0
    # the draws matter: another seed picks differently, and eval mode uses no noise at all
    other = layer(x, generator=torch.Generator().manual_seed(12)).output
    assert not torch.allclose(other, out.output)
    assert picks != naive(layer, x, seed=12)[1] or jitter > 0


def test_jitter_multiplies_the_router_input_only():
    """With a router input jittered strongly, the expert outputs still come from x: routing the same picks
    with weights from the jittered logits, on x, gives the layer's output."""
    layer = _layer("topk", 0.5)
    x = torch.randn(T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = layer(x, generator=torch.Generator().manual_seed(5)).output
    ref, _ = naive(layer, x, seed=5)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    # a layer whose experts saw the jittered x would differ
    u = torch.empty(x.shape, dtype=x.dtype).uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(out, naive(layer, x * u, seed=5)[0])


def test_the_same_generator_state_gives_the_same_draws_and_eval_draws_none():
    layer = _layer("noisy_topk")
    x = torch.randn(T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    a = layer(x, generator=torch.Generator().manual_seed(7)).output
    b = layer(x, generator=torch.Generator().manual_seed(7)).output
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    layer.eval()(x, generator=g)
    assert torch.equal(g.get_state(), state)  # eval routing draws nothing
