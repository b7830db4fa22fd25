"""Options on the existing routers, through the layer: null experts, zero-computation experts, bias
updates, routing replay (layer and MoETransformer, through torch.save / load).

Legend: T tokens, D model dim, E experts, K top-k, H expert hidden.
References here share no code with the layer: experts are evaluated one token at a time from their
weight matrices, softmax / quantiles with Python lists.
"""
from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.config import ModelConfig
from moekit.nn.transformer import MoETransformer

D, H, T = 8, 12, 10


def layer_for(seed: int = 0, **kw) -> MoELayer:
    cfg = MoEConfig(**{"d_model": D, "d_hidden": H, "num_experts": 4, "top_k": 2, **kw})
    layer = MoELayer(cfg).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            scale = 1.0 if name.startswith("router.") else 1.0 / math.sqrt(p.shape[-1])
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)
    return layer


def tokens(n: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def expert_out(layer: MoELayer, e: int, x: torch.Tensor) -> torch.Tensor:
    """Routed expert e (swiglu) on one token, from its weight matrices."""
    w = layer.experts
    g, u = w.w_gate[e] @ x, w.w_up[e] @ x
    return w.w_down[e] @ (g / (1 + torch.exp(-g)) * u)


# -- null experts ---------------------------------------------------------------------------------
def test_no_null_experts_is_the_plain_topk_layer():
    """N = 0 is today's topk: no extra parameter, and the very same numbers as a layer built before the
    option existed (same seed, same state dict keys)."""
    plain, zero = layer_for(3), layer_for(3, num_null_experts=0)
    assert plain.router.extra_weight is None and plain.state_dict().keys() == zero.state_dict().keys()
    a, b = plain(tokens()), zero(tokens())
    assert torch.equal(a.output, b.output) and torch.equal(a.aux_loss, b.aux_loss)


def test_null_only_token_outputs_exactly_zero():
    """Token 0's null logits dwarf every routed one: both its picks are null, its output is exactly 0;
    the other tokens' weights are renormalised over their routed picks."""
    layer = layer_for(4, num_null_experts=2)
    x = tokens()
    with torch.no_grad():
        layer.router.extra_weight.copy_(torch.stack([x[0], x[0]]) * (50 / x[0].norm() ** 2))
        layer.router.extra_weight[1] *= 0.99  # no tie between the two null experts
    out = layer(x)
    assert torch.equal(out.output[0], torch.zeros(D, dtype=torch.float64))
    logits = torch.cat([layer.router.weight, layer.router.extra_weight]) @ x.T  # (E + N, T)
    for t in range(1, T):
        p = logits[:, t].softmax(0).tolist()
        top = sorted(range(6), key=lambda e: -p[e])[:2]
        routed = [e for e in top if e < 4]
        total = sum(p[e] for e in routed)
        want = sum(p[e] / total * expert_out(layer, e, x[t]) for e in routed) if routed else torch.zeros(D)
        torch.testing.assert_close(out.output[t], want.double(), rtol=1e-10, atol=1e-12)
    st = out.stats
    assert int(st.extra_tokens_per_expert.sum()) + int(st.tokens_per_expert.sum()) == 2 * T
    assert st.to_dict()["tokens_per_kind"]["null"] == int(st.extra_tokens_per_expert.sum()) >= 2


def test_extra_experts_need_topk():
    with pytest.raises(ValueError, match="need router='topk', not 'sigmoid_bias'"):
        MoEConfig(d_model=D, d_hidden=H, router="sigmoid_bias", num_copy_experts=1)
    with pytest.raises(ValueError, match=r"num_null_experts=-1 must be an integer >= 0"):
        MoEConfig(d_model=D, d_hidden=H, num_null_experts=-1)


def test_copy_and_constant_experts_by_hand():
    """One copy and one constant expert, routed experts made unattractive: y = w_copy x + w_const (a1 x + a2 v)."""
    layer = layer_for(5, num_copy_experts=1, num_constant_experts=1)
    x = tokens(4)
    with torch.no_grad():
        layer.router.weight.zero_()  # routed logits 0
        layer.router.extra_weight.copy_(torch.stack([x.sum(0), x.sum(0) * 0.9]) * 10)
    out = layer(x)
    zc = layer.zero_experts
    for t in range(4):
        l = torch.cat([torch.zeros(4, dtype=torch.float64), layer.router.extra_weight @ x[t]])
        p = l.softmax(0)
        top = p.topk(2).indices.tolist()
        assert sorted(top) == [4, 5], "the data should route every token to the two zero-computation experts"
        w = p[[4, 5]] / p[[4, 5]].sum()
        a = (zc.const_gate[0] @ x[t]).softmax(0)
        want = w[0] * x[t] + w[1] * (a[0] * x[t] + a[1] * zc.const_vector[0])
        torch.testing.assert_close(out.output[t], want, rtol=1e-10, atol=1e-12)
    assert out.stats.to_dict()["tokens_per_kind"] == {"copy": 4, "constant": 4}


# -- bias updates through the layer ------------------------------------------------------------------
def _quantile(v: list[float], q: float) -> float:
    v = sorted(v)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    return v[lo] + (pos - lo) * (v[min(lo + 1, len(v) - 1)] - v[lo])


def test_quantile_bias_update_through_the_layer():
    layer = layer_for(6, router="sigmoid_bias", bias_update="quantile")
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([0.3, -0.1, 0.0, 0.2]))
    x = tokens(12)
    st = layer(x).stats
    s = (x @ layer.router.weight.T).sigmoid().tolist()
    b = layer.router.expert_bias.tolist()
    alpha = [sorted((a + c for a, c in zip(row, b)), reverse=True)[2] for row in s]  # (k+1)-th, k = 2
    want = [_quantile([alpha[t] - s[t][e] for t in range(12)], 2 / 4) for e in range(4)]
    want = [w - sum(want) / 4 for w in want]
    torch.testing.assert_close(st.bias_target, torch.tensor(want, dtype=torch.float64))
    layer.update_expert_bias(st.tokens_per_expert, st.bias_target)
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor(want, dtype=torch.float64))


def test_sign_centered_update_through_the_layer():
    layer = layer_for(7, router="sigmoid_bias", bias_update="sign_centered", bias_update_rate=0.1)
    layer.update_expert_bias(torch.tensor([5, 1, 1, 1]))
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.15, 0.05, 0.05, 0.05], dtype=torch.float64))


# -- routing replay --------------------------------------------------------------------------------
def _reload(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)  # weights_only: a record is plain lists / dicts of tensors


@pytest.mark.parametrize("kw", [{"router": "topk"}, {"router": "sigmoid_bias", "n_group": 2, "topk_group": 1},
                                {"router": "noisy_topk"}, {"router": "topk", "num_null_experts": 1}])
def test_replay_reuses_choices_with_current_weights(kw):
    layer = layer_for(8, **kw)
    x1, x2 = tokens(seed=2), tokens(7, seed=3)
    with layer.record_routing() as rec:
        a1, a2 = layer(x1), layer(x2)
    assert [r.shape for r in rec] == [(T, 2), (7, 2)]
    rec = _reload(rec)
    with layer.replay_routing(rec):
        b1, b2 = layer(x1), layer(x2)
    assert torch.equal(a1.output, b1.output) and torch.equal(a2.output, b2.output)
    # the router moves: fresh routing changes its choices; replay keeps the recorded ones
    with torch.no_grad():
        layer.router.weight.add_(torch.randn(layer.router.weight.shape, generator=torch.Generator().manual_seed(9),
                                             dtype=torch.float64) * 2)
    fresh = layer.router(x1)
    assert not torch.equal(fresh.indices_TK, rec[0])
    layer.zero_grad()
    with layer.replay_routing(rec):
        c1 = layer(x1)
        layer(x2)
    replayed = layer.router(x1, picks_TK=rec[0])
    assert torch.equal(replayed.indices_TK, rec[0])
    if kw["router"] == "topk" and "num_null_experts" not in kw:  # weights = current p at the picks, renormalised
        p = (x1 @ layer.router.weight.T).softmax(-1).gather(1, rec[0])
        want = torch.stack([sum(p[t, j] / p[t].sum() * expert_out(layer, int(rec[0][t, j]), x1[t]) for j in range(2))
                            for t in range(T)])
        torch.testing.assert_close(c1.output, want, rtol=1e-10, atol=1e-12)
    (c1.output.square().sum() + c1.aux_loss).backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_replay_errors_name_the_problem():
    layer = layer_for(1)
    with layer.record_routing() as rec:
        layer(tokens())
    with pytest.raises(RuntimeError, match="holds 1 call"), layer.replay_routing(rec):
        layer(tokens())
        layer(tokens())
    with pytest.raises(ValueError, match="routes 5 rows"), layer.replay_routing(rec):
        layer(tokens(5))
    with pytest.raises(ValueError, match="needs a top-k router"):
        layer_for(1, router="dense").record_routing().__enter__()


def test_replay_through_the_transformer_survives_save_and_load():
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=3, n_heads=2, max_seq_len=16, first_dense_layers=1,
                      moe=MoEConfig(d_model=16, d_hidden=8, num_experts=4, top_k=2))
    torch.manual_seed(0)
    model = MoETransformer(cfg).eval()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    with model.record_routing() as rec:
        want = model(ids).logits
    assert sorted(rec) == [1, 2] and all(len(v) == 1 and v[0].shape == (18, 2) for v in rec.values())
    rec = _reload(rec)
    with model.replay_routing(rec):
        got = model(ids)
    assert torch.equal(got.logits, want)
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.weight.mul_(-3.0)
    with model.replay_routing(rec):
        out = model(ids, labels=ids)
    out.loss.backward()
    for layer in model.moe_layers():
        assert layer.router.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"no calls for MoE layer\(s\) \[2\]"):
        model.replay_routing({1: rec[1]}).__enter__()


# -- torch.compile ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    {"router": "topk", "num_null_experts": 1, "num_zero_experts": 1, "num_copy_experts": 1,
     "num_constant_experts": 1, "capacity_factor": 1.25},
    {"router": "sigmoid_bias", "n_group": 2, "topk_group": 1, "group_score": "max", "num_devices": 2,
     "device_loss_coef": 0.1, "comm_loss_coef": 0.1, "bias_update": "quantile"},
], ids=["null-zero-compute-cap", "group-max-devices-quantile"])
def test_options_trace_without_graph_breaks(kw):
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=16, d_hidden=24, num_experts=4, top_k=2, **kw))

    def run(x):
        out = layer(x)
        return out.output, out.aux_loss, out.stats.tokens_per_expert

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = torch._dynamo.explain(run)(torch.randn(2, 8, 16))
    assert ex.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in ex.break_reasons]
