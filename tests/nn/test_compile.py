"""torch.compile: the MoE layer (every router, dropless and capacity) and the LM trace with no graph
break, and compiled forward/backward equal eager. The top_p, relu, hierarchical, sinkhorn, base, hash
and soft routers are in test_routers_compile.py: sinkhorn and base break the graph in training only
(one host-side call each: the Sinkhorn convergence loop, the numpy balanced assignment)."""
from __future__ import annotations

import warnings

import pytest
import torch

from moekit.config import MoEConfig
from moekit.model import ModelConfig, MoETransformer
from moekit.nn.moe import MoELayer

ROUTERS = ["topk", "switch", "noisy_topk", "sigmoid_bias", "expert_choice", "dense"]
CASES = [(r, cf) for r in ROUTERS for cf in (None, 1.25) if not (cf and r in ("expert_choice", "dense"))]


def _layer(router: str, cf, **kw) -> MoELayer:
    torch.manual_seed(0)
    extra = {"n_group": 2, "topk_group": 1} if router == "sigmoid_bias" else {}
    cfg = MoEConfig(d_model=16, d_hidden=24, num_experts=4, top_k=1 if router == "switch" else 2, router=router,
                    capacity_factor=cf, **extra, **kw)
    return MoELayer(cfg)


def _graph_breaks(fn, *args) -> tuple[int, list[str]]:
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = torch._dynamo.explain(fn)(*args)
    return ex.graph_break_count, [str(b.reason).splitlines()[0] for b in ex.break_reasons]


@pytest.mark.parametrize("router,cf", CASES, ids=[f"{r}-{'cap' if cf else 'dropless'}" for r, cf in CASES])
def test_layer_traces_without_graph_breaks(router, cf):
    layer = _layer(router, cf, num_shared_experts=1 if router == "sigmoid_bias" else 0)
    x = torch.randn(2, 8, 16)
    breaks, reasons = _graph_breaks(lambda x: layer(x).output, x)
    assert breaks == 0, reasons


def test_sequence_aux_and_loop_free_stats_trace_without_graph_breaks():
    layer = _layer("sigmoid_bias", None, seq_aux=True, aux_loss_coef=0.01)
    breaks, reasons = _graph_breaks(lambda x: (lambda o: (o.output, o.aux_loss, o.stats.tokens_per_expert))(layer(x)),
                                    torch.randn(3, 8, 16))
    assert breaks == 0, reasons


def test_lm_trains_under_compile_without_graph_breaks():
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=32,
                      moe=MoEConfig(d_model=16, d_hidden=24, num_experts=4, top_k=2, capacity_factor=1.25))
    model = MoETransformer(cfg)
    ids, labels = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    breaks, reasons = _graph_breaks(lambda i, l: model(i, labels=l).loss, ids, labels)
    assert breaks == 0, reasons
    attention_mask = torch.ones(2, 16, dtype=torch.long)
    attention_mask[0, :5] = 0  # left padding
    breaks, reasons = _graph_breaks(lambda i, l, a: model(i, labels=l, attention_mask=a).loss, ids, labels,
                                    attention_mask)
    assert breaks == 0, reasons


def _loss_and_grads(fn, layer: MoELayer, x: torch.Tensor):
    for p in layer.parameters():
        p.grad = None
    xg = x.clone().requires_grad_(True)
    out = fn(xg)
    loss = (out.output * torch.linspace(-1, 1, out.output.numel()).view_as(out.output)).sum() + out.aux_loss
    loss.backward()
    return out.output.detach(), out.stats.tokens_per_expert, xg.grad, [p.grad.clone() for p in layer.parameters()]


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[2], b[2], rtol=1e-5, atol=1e-6)
    for ga, gb in zip(a[3], b[3]):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router,cf", [("topk", 1.0), ("sigmoid_bias", None), ("expert_choice", None)])
def test_compiled_forward_backward_equal_eager_aot(router, cf):
    """aot_eager runs the custom op's fake kernel and autograd formula through AOTAutograd."""
    layer = _layer(router, cf)
    x = torch.randn(2, 12, 16)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    _assert_same(_loss_and_grads(compiled, layer, x), _loss_and_grads(layer, layer, x))


def test_inductor_compiled_capacity_layer_equals_eager():
    """The real compiler (C++ codegen) on capacity mode, whole graph (fullgraph=True)."""
    layer = _layer("topk", 1.25)
    x = torch.randn(2, 16, 16)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    _assert_same(_loss_and_grads(compiled, layer, x), _loss_and_grads(layer, layer, x))
    # a second shape recompiles (or reuses a dynamic graph) and is still right
    x2 = torch.randn(1, 10, 16)
    _assert_same(_loss_and_grads(compiled, layer, x2), _loss_and_grads(layer, layer, x2))


MASKED = [c for c in CASES if c[0] != "expert_choice"]


@pytest.mark.parametrize("router,cf", MASKED, ids=[f"{r}-{'cap' if cf else 'dropless'}" for r, cf in MASKED])
def test_padding_mask_traces_without_graph_breaks_and_matches_eager(router, cf):
    """With a token_mask, token-choice and dense routers keep static shapes (padding is masked, not
    removed): no graph break, and the compiled layer equals eager, padding outputs exactly 0."""
    layer = _layer(router, cf, seq_aux=router == "sigmoid_bias", aux_loss_coef=0.01, z_loss_coef=1e-3,
                   importance_loss_coef=0.1).eval()  # eval: noisy_topk deterministic
    x = torch.randn(2, 9, 16)
    x[1, 6:] = float("nan")  # padding content must never matter
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    breaks, reasons = _graph_breaks(lambda x, m: layer(x, token_mask=m).output, x, mask)
    assert breaks == 0, reasons
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    want = layer(x, token_mask=mask)
    got = compiled(x, token_mask=mask)
    torch.testing.assert_close(got.output, want.output, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.output[1, 6:], torch.zeros(3, 16))
    torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-5, atol=1e-7)
    assert torch.equal(got.stats.tokens_per_expert, want.stats.tokens_per_expert)
    assert int(got.stats.num_tokens) == want.stats.num_tokens == 15
    assert int(got.stats.dropped) == int(want.stats.dropped)
    gy = torch.randn_like(want.output)
    params = list(layer.parameters())
    g_want = torch.autograd.grad((want.output * gy).sum() + want.aux_loss, params, allow_unused=True)
    g_got = torch.autograd.grad((got.output * gy).sum() + got.aux_loss, params, allow_unused=True)
    for a, b in zip(g_got, g_want):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_expert_choice_with_padding_still_compiles_with_a_break():
    layer = _layer("expert_choice", None)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 5:] = False
    breaks, _ = _graph_breaks(lambda x, m: layer(x, token_mask=m).output, torch.randn(2, 8, 16), mask)
    assert breaks >= 1  # each expert's pick is sized by the count of real tokens
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(2, 8, 16)
    torch.testing.assert_close(compiled(x, token_mask=mask).output, layer(x, token_mask=mask).output)
