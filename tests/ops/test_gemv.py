"""The single-row streaming kernels: the products of ``F.linear`` to fp32 rounding, taken only where they
apply (one row, a large weight, no autograd), and a plain ``F.linear`` with one warning when they cannot
be compiled. ``MIN_BYTES`` is lowered so small weights exercise them."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from moekit.nn.linear import Linear
from moekit.ops import gemv
from moekit.ops.gemv import linear, single_row_kernel, swiglu_expert

N, K = 48, 40


@pytest.fixture
def calls(monkeypatch):
    """Every weight takes the kernels; returns the list of kernel names run."""
    monkeypatch.setattr(gemv, "MIN_BYTES", 0)
    seen: list[str] = []
    run = gemv._KERNELS.run

    def counting(name, *args):
        seen.append(name)
        return run(name, *args)

    monkeypatch.setattr(gemv._KERNELS, "run", counting)
    return seen


def _tol(dtype):
    # fp32: a reordered sum of K products; bf16: the result is rounded once to 8 bits of mantissa
    return 1e-5 if dtype == torch.float32 else 8e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(K,), (1, K), (1, 1, K)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_float64_reference(calls, dtype, shape, bias):
    g = torch.Generator().manual_seed(len(shape) + 3 * bias)
    x, w = torch.randn(shape, generator=g).to(dtype), torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    with torch.no_grad():
        y = linear(x, w, b)
    ref = x.double() @ w.double().t() + (b.double() if bias else 0)
    assert calls == ["gemv_bias" if bias else "gemv"]
    assert y.shape == (*shape[:-1], N) and y.dtype == dtype
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.double(), ref, rtol=_tol(dtype), atol=_tol(dtype) * scale)
    # no less accurate than F.linear's own result
    err, mkl_err = (y.double() - ref).abs().max(), (F.linear(x, w, b).double() - ref).abs().max()
    assert err <= 2 * mkl_err + 1e-6 * scale


def test_calls_it_does_not_apply_to_take_f_linear(calls):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g)
    rows = torch.randn(3, K, generator=g)
    assert torch.equal(linear(rows, w), F.linear(rows, w))  # several rows: a GEMM
    x = torch.randn(1, K, generator=g, requires_grad=True)
    y = linear(x, w)  # autograd records: the kernel has no backward
    assert y.grad_fn is not None
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0, keepdim=True))
    x = x.detach()
    ws = w.t().contiguous().t()
    assert torch.equal(linear(x, ws), F.linear(x, ws))  # a strided weight
    assert torch.equal(linear(x.double(), w.double()), F.linear(x.double(), w.double()))  # float64
    with pytest.raises(RuntimeError):  # mixed dtypes: F.linear's own error, not a silent cast
        linear(x.bfloat16(), w)
    assert calls == []


def test_small_weights_stay_on_f_linear():
    w, x = torch.randn(N, K), torch.randn(1, K)
    assert w.nbytes < gemv.MIN_BYTES and not single_row_kernel(x, w)
    big = torch.empty(gemv.MIN_BYTES // 4 // K + 1, K)
    with torch.no_grad():
        assert single_row_kernel(x, big)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_expert_matches_float64_reference(calls, dtype):
    g = torch.Generator().manual_seed(7)
    D, H = 24, 56
    x = torch.randn(1, D, generator=g).to(dtype)
    wg, wu = torch.randn(H, D, generator=g).to(dtype), torch.randn(H, D, generator=g).to(dtype)
    wd = (torch.randn(D, H, generator=g) / H ** 0.5).to(dtype)
    scale = torch.tensor([0.375])
    with torch.no_grad():
        y = swiglu_expert(x, wg, wu, wd, scale)
    xd = x.double()[0]
    ref = 0.375 * (wd.double() @ (F.silu(wg.double() @ xd) * (wu.double() @ xd)))
    assert calls == ["swiglu_expert"] and y.shape == (1, D) and y.dtype == dtype
    tol = _tol(dtype)  # the hidden activations stay in fp32: one rounding, at the end
    torch.testing.assert_close(y[0].double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    assert swiglu_expert(torch.randn(2, D).to(dtype), wg, wu, wd, scale) is None  # two rows: not for it


def test_compile_failure_warns_once_and_falls_back(monkeypatch):
    kernels = gemv._Kernels()
    monkeypatch.setattr(gemv, "_KERNELS", kernels)
    monkeypatch.setattr(gemv, "MIN_BYTES", 0)

    def broken(name):
        raise RuntimeError("no C++ compiler found\nlong details")

    monkeypatch.setattr(kernels, "get", broken)
    x, w = torch.randn(1, K), torch.randn(N, K)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        y = linear(x, w)
    assert torch.equal(y, F.linear(x, w)) and kernels.failed.startswith("RuntimeError")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the kernels are off for good
        with torch.no_grad():
            assert torch.equal(linear(x, w), F.linear(x, w))
            assert swiglu_expert(x, w, w, w.t().contiguous(), torch.ones(1)) is None


def test_warm_up_compiles_what_decoding_then_reuses(monkeypatch):
    """After warm_up, one-row products over parameters, inference tensors and expert views, in inference
    mode as decoding runs, compile nothing more."""
    import torch._dynamo.utils as dynamo_utils

    kernels = gemv._Kernels()  # fresh: nothing compiled yet
    monkeypatch.setattr(gemv, "_KERNELS", kernels)
    monkeypatch.setattr(gemv, "MIN_BYTES", 4096)
    small, big = Linear(8, 8), Linear(K, N)
    experts = torch.nn.Parameter(torch.randn(3, 64, K).bfloat16(), requires_grad=False)
    assert gemv.warm_up([small.weight]) == []  # nothing large: nothing compiled
    assert kernels.fns == {}
    assert gemv.warm_up([small.weight, big.weight, experts]) == [torch.bfloat16, torch.float32]
    compiled = dynamo_utils.counters["stats"]["unique_graphs"]
    gate, up, down = (torch.randn(3, *shape).bfloat16() for shape in ((64, K), (64, K), (K, 64)))
    with torch.inference_mode():
        x, xb = torch.randn(1, K), torch.randn(1, K).bfloat16()
        torch.testing.assert_close(big(x), F.linear(x, big.weight, big.bias))
        loaded = torch.randn(N, K)  # an inference tensor: a model loaded under inference mode
        torch.testing.assert_close(linear(x, loaded), F.linear(x, loaded))
        for e in range(3):  # expert 0 at storage offset 0, the others not
            ref = F.linear(F.silu(F.linear(xb, gate[e])) * F.linear(xb, up[e]), down[e])
            got = swiglu_expert(xb, gate[e], up[e], down[e], torch.ones(1))
            torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    assert set(kernels.fns) == {"gemv", "gemv_bias", "swiglu_expert"} and kernels.failed is None
    assert dynamo_utils.counters["stats"]["unique_graphs"] == compiled


def test_warm_up_for_experts_kept_elsewhere(monkeypatch):
    """Offloaded experts are not among the model's tensors: their (H, D, dtype) is enough."""
    import torch._dynamo.utils as dynamo_utils

    monkeypatch.setattr(gemv, "_KERNELS", gemv._Kernels())
    monkeypatch.setattr(gemv, "MIN_BYTES", 4096)
    assert gemv.warm_up([], [(64, K, torch.bfloat16), (2, 2, torch.float32)]) == [torch.bfloat16]
    compiled = dynamo_utils.counters["stats"]["unique_graphs"]
    with torch.inference_mode():  # as the expert cache hands them over: one tensor per expert
        gate, up, down = (torch.randn(*shape).bfloat16() for shape in ((64, K), (64, K), (K, 64)))
        x = torch.randn(1, K).bfloat16()
        xf = x.float()
        ref = F.linear(F.silu(F.linear(xf, gate.float())) * F.linear(xf, up.float()), down.float())
        got = swiglu_expert(x, gate, up, down, torch.ones(1))
    torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    assert dynamo_utils.counters["stats"]["unique_graphs"] == compiled


def test_swiglu_expert_refuses_mismatched_matrices(calls):
    """A caller's shape bug is its own error, not a compile failure that would turn the kernels off."""
    x, w = torch.randn(1, K), torch.randn(N, K)
    with torch.no_grad():
        assert swiglu_expert(x, torch.randn(N + 1, K), w, torch.randn(K, N), torch.ones(1)) is None
        assert swiglu_expert(x, w, w.clone(), torch.randn(K, N + 1), torch.ones(1)) is None
        assert swiglu_expert(x, w.bfloat16(), w, torch.randn(K, N), torch.ones(1)) is None
    assert calls == [] and gemv._KERNELS.failed is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_traced_rows_inside_a_compiled_graph(dtype):
    """In a compiled graph, 1 to TRACED_MAX_ROWS rows over a small weight are traced reductions (a graph
    with no GEMM call left in it) with ``F.linear``'s products to fp32 rounding; more rows take the GEMM."""
    torch.manual_seed(0)
    w, b = torch.randn(N, K).to(dtype), torch.randn(N).to(dtype)
    for rows in (1, 3, gemv.TRACED_MAX_ROWS, gemv.TRACED_MAX_ROWS + 1):
        graphs = []

        def keep(gm, example_inputs, graphs=graphs):  # what dynamo traced, run as it is
            graphs.append(gm)
            return gm.forward

        x = torch.randn(rows, 1, K).to(dtype)
        with torch.no_grad():
            got = torch.compile(lambda x: linear(x, w, b), backend=keep, fullgraph=True, dynamic=False)(x)
            want = (x.double() @ w.double().T + b.double()).to(dtype)
        torch.testing.assert_close(got, want, atol=_tol(dtype) * 8, rtol=_tol(dtype))
        calls = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
        assert any("linear" in c for c in calls) == (rows > gemv.TRACED_MAX_ROWS), calls
