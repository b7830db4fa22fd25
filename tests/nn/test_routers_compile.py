"""torch.compile of the dynamic, balanced and hierarchical routers: which trace without a graph break,
which break and why, and the compiled layer equals eager (forward and backward).

Graph breaks (training mode only; eval is break-free for every router):
- sinkhorn: the Sinkhorn loop stops on a host-side convergence test (and raises its named error), so
  it runs outside the graph, as one ``torch.compiler.disable``d call;
- base: the balanced assignment is solved on the host in numpy, one disabled call likewise.
top_p and relu keep static shapes (K columns and an active mask), hierarchical, hash and soft have no
data-dependent step: no break in either mode.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from moekit.config import MoEConfig
from moekit.model import ModelConfig, MoETransformer
from moekit.nn.moe import MoELayer

KW = {"top_p": {}, "relu": {}, "hierarchical": {"num_expert_groups": 2, "group_top_k": 2, "top_k": 1},
      "sinkhorn": {}, "base": {"top_k": 1}, "hash": {"top_k": 1, "hash_vocab_size": 50},
      "soft": {"slots_per_expert": 2}}
BREAKS_IN_TRAINING = {"sinkhorn", "base"}
CASES = [(r, cf, mode) for r in KW for cf in (None, 1.25) for mode in ("eval", "train")
         if not (cf and r == "soft")]


def _layer(router: str, cf=None) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(MoEConfig(d_model=16, d_hidden=24, num_experts=4, router=router, capacity_factor=cf,
                              **{"top_k": 2, **KW[router]}))


def _graph_breaks(fn, *args) -> tuple[int, list[str]]:
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = torch._dynamo.explain(fn)(*args)
    return ex.graph_break_count, [str(b.reason).splitlines()[0] for b in ex.break_reasons]


@pytest.mark.parametrize("router,cf,mode", CASES, ids=[f"{r}-{'cap' if cf else 'dropless'}-{m}" for r, cf, m in CASES])
def test_graph_breaks_are_the_documented_ones(router, cf, mode):
    layer = getattr(_layer(router, cf), mode)()
    x, ids = torch.randn(2, 8, 16), torch.randint(0, 50, (2, 8))
    breaks, reasons = _graph_breaks(lambda x, i: (lambda o: (o.output, o.aux_loss))(layer(x, token_ids=i)), x, ids)
    if mode == "train" and router in BREAKS_IN_TRAINING:
        assert breaks >= 1 and all("disable" in r for r in reasons), reasons
    else:
        assert breaks == 0, reasons


@pytest.mark.parametrize("router", list(KW))
def test_compiled_forward_backward_equal_eager(router):
    """aot_eager, training mode (the break, where there is one, is a plain eager call)."""
    layer = _layer(router, 1.25 if router != "soft" else None).train()
    x = torch.randn(2, 8, 16)
    ids = torch.randint(0, 50, (2, 8))
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=router not in BREAKS_IN_TRAINING)
    results = []
    for fn in (compiled, layer):
        for p in layer.parameters():
            p.grad = None
        xg = x.clone().requires_grad_(True)
        out = fn(xg, token_ids=ids)
        (out.output * torch.linspace(-1, 1, out.output.numel()).view_as(out.output)).sum().add(out.aux_loss).backward()
        results.append((out.output.detach(), out.stats.tokens_per_expert, xg.grad,
                        [None if p.grad is None else p.grad.clone() for p in layer.parameters()]))
    (ya, ta, ga, pa), (yb, tb, gb, pb) = results
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    assert torch.equal(ta, tb)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)
    for a, b in zip(pa, pb):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router", ["top_p", "relu", "hash"])
def test_lm_with_the_router_traces_without_graph_breaks(router):
    """MoETransformer passes the token ids to a hash layer inside the graph."""
    moe = MoEConfig(d_model=16, d_hidden=24, num_experts=4, router=router, **{"top_k": 2, **KW[router]})
    model = MoETransformer(ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, max_seq_len=32, moe=moe))
    ids, labels = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    breaks, reasons = _graph_breaks(lambda i, l: model(i, labels=l).loss, ids, labels)
    assert breaks == 0, reasons
