"""The fused grouped-FFN op against the readable loop, on a size with many rows per expert."""
from __future__ import annotations

import pytest
import torch

import moekit.ops.grouped_ffn as grouped_ffn_module
from moekit.functional.dispatch import loop_experts_reference
from moekit.ops.grouped_ffn import grouped_ffn


@pytest.mark.parametrize("expert_threads", [False, True], ids=["serial", "expert-threads"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
def test_fused_op_matches_loop_with_empty_experts(activation, expert_threads, monkeypatch):
    """Experts 1 and 5 get no rows: their weight gradients must be exactly zero, not garbage.
    Both execution modes (experts serial with threaded GEMMs; whole experts spread over threads)."""
    monkeypatch.setattr(grouped_ffn_module, "use_expert_threads", lambda *a, **k: expert_threads)
    g = torch.Generator().manual_seed(0)
    T, D, H, E, A = 300, 12, 20, 6, 700
    x = torch.randn(T, D, dtype=torch.float64, generator=g, requires_grad=True)
    ws = [torch.randn(E, H, D, dtype=torch.float64, generator=g) if activation == "swiglu" else None,
          torch.randn(E, H, D, dtype=torch.float64, generator=g), torch.randn(E, D, H, dtype=torch.float64, generator=g)]
    ws = [w.requires_grad_(True) if w is not None else None for w in ws]
    token = torch.randint(0, T, (A,), generator=g)
    expert = torch.tensor([0, 2, 3, 4])[torch.randint(0, 4, (A,), generator=g)]
    weight = torch.rand(A, dtype=torch.float64, generator=g, requires_grad=True)
    out = grouped_ffn(x, token, expert, weight, *ws, activation)
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


def _problem(activation, A=500, T=200, D=10, H=14, E=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, dtype=torch.float64, generator=g, requires_grad=True)
    ws = [torch.randn(E, H, D, dtype=torch.float64, generator=g) if activation == "swiglu" else None,
          torch.randn(E, H, D, dtype=torch.float64, generator=g), torch.randn(E, D, H, dtype=torch.float64, generator=g)]
    ws = [w.requires_grad_(True) if w is not None else None for w in ws]
    token = torch.randint(0, T, (A,), generator=g)
    expert = torch.randint(0, E + 1, (A,), generator=g)  # E = dropped
    expert[expert == 3] = 2  # expert 3 gets nothing
    weight = torch.rand(A, dtype=torch.float64, generator=g, requires_grad=True)
    return x, token, expert, weight, ws


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
def test_unsorted_op_with_dropped_assignments_matches_loop(activation):
    """The custom op takes assignments in any order; expert id E means dropped: no output, zero grad."""
    x, token, expert, weight, ws = _problem(activation)
    E = ws[1].shape[0]
    out = grouped_ffn(x, token, expert, weight, *ws, activation)
    keep = expert < E
    ref = loop_experts_reference(x, token[keep], expert[keep], weight[keep], *ws, activation)
    torch.testing.assert_close(out, ref)
    leaves = [t for t in (x, weight, *ws) if t is not None]
    gy = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, gy)
    want = torch.autograd.grad(ref, leaves, gy, allow_unused=True)
    want = [torch.zeros_like(l) if w is None else w for l, w in zip(leaves, want)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert torch.equal(got[1][~keep], torch.zeros_like(got[1][~keep]))  # dropped weights: exactly 0
    for gw in got[2:]:
        assert torch.equal(gw[3], torch.zeros_like(gw[3]))


def test_unsorted_op_gradcheck_and_partial_needs():
    x, token, expert, weight, ws = _problem("swiglu", A=40, T=15, D=4, H=5, E=3)
    assert torch.autograd.gradcheck(lambda *t: grouped_ffn(t[0], token, expert, t[1], *t[2:], "swiglu"),
                                    (x, weight, *ws))
    # only some inputs need a gradient: the others come back as None, the rest still right
    wg, wu, wd = (w.detach() for w in ws)
    out = grouped_ffn(x, token, expert, weight.detach(), wg, wu, wd.requires_grad_(True), "swiglu")
    gx, gwd = torch.autograd.grad(out.sum(), (x, wd))
    ref = loop_experts_reference(x, token[expert < 3], expert[expert < 3], weight.detach()[expert < 3], wg, wu, wd,
                                 "swiglu")
    rx, rwd = torch.autograd.grad(ref.sum(), (x, wd))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gwd, rwd)


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_custom_op_registration_passes_opcheck(activation):
    """torch.library.opcheck: schema, fake (meta) kernel vs the real one, autograd registration."""
    x, token, expert, weight, ws = _problem(activation, A=60, T=20, D=4, H=6, E=3)
    args = (x, token, expert, weight, *ws, activation)
    torch.library.opcheck(torch.ops.moekit.grouped_ffn.default, args)


def test_eager_function_and_custom_op_agree_exactly():
    """Eagerly grouped_ffn runs an autograd Function; under torch.compile, the custom op: same kernels."""
    x, token, expert, weight, ws = _problem("swiglu", A=80, T=30, D=6, H=7, E=4)
    leaves = [x, weight, *ws]
    out_f = grouped_ffn(x, token, expert, weight, *ws, "swiglu")
    out_op = torch.ops.moekit.grouped_ffn(x, token, expert, weight, *ws, "swiglu")[0]
    assert torch.equal(out_f, out_op)
    gy = torch.randn_like(out_f)
    for a, b in zip(torch.autograd.grad(out_f, leaves, gy), torch.autograd.grad(out_op, leaves, gy)):
        assert torch.equal(a, b)
