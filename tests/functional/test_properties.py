"""Properties of MoELayer that hold for any data (hypothesis).

Legend: T tokens, D model dim, E experts, K top-k.
"""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import MoEConfig, MoELayer

D = 8
FAST = settings(max_examples=25, deadline=None, database=None)

TOKEN_CHOICE = ["topk", "topk_raw", "switch", "noisy_topk", "sigmoid_bias", "sigmoid_bias_g2"]


def cfg_kwargs(router: str, E: int, k: int) -> dict:
    if router == "switch":
        return {"router": "switch", "top_k": 1}
    if router == "topk_raw":
        return {"router": "topk", "top_k": k, "norm_topk": False}
    if router == "sigmoid_bias_g2":  # E is even below: two groups of E/2, one eligible
        return {"router": "sigmoid_bias", "top_k": min(k, E // 2), "n_group": 2, "topk_group": 1,
                "routed_scaling_factor": 1.5}
    return {"router": router, "top_k": k}


def build(router: str, E: int, k: int, seed: int, **kw) -> MoELayer:
    d_hidden = kw.pop("d_hidden", 12)
    cfg = MoEConfig(d_model=D, d_hidden=d_hidden, num_experts=E, **cfg_kwargs(router, E, k), **kw)
    layer = MoELayer(cfg).eval()  # eval: noisy_topk without noise
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            scale = 1.0 if name.startswith("router.") else 1.0 / math.sqrt(p.shape[-1])
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.copy_(torch.randn(E, generator=g) * 0.3)
    return layer


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed + 12345))


@FAST
@given(router=st.sampled_from(TOKEN_CHOICE + ["dense"]), E=st.sampled_from([4, 6]), k=st.integers(1, 3),
       seed=st.integers(0, 2**16), data=st.data())
def test_permuting_tokens_permutes_outputs(router, E, k, seed, data):
    """Dropless token-choice routing treats every token on its own: order does not matter."""
    n = data.draw(st.integers(1, 30), label="n")
    perm = torch.tensor(data.draw(st.permutations(range(n)), label="perm"))
    layer = build(router, E, k, seed, num_shared_experts=1, shared_d_hidden=4)
    x = tokens(n, seed)
    a, b = layer(x), layer(x[perm])
    torch.testing.assert_close(b.output, a.output[perm], rtol=1e-5, atol=1e-6)
    assert torch.equal(a.stats.tokens_per_expert, b.stats.tokens_per_expert)
    torch.testing.assert_close(a.aux_loss, b.aux_loss, rtol=1e-5, atol=1e-7)


@FAST
@given(router=st.sampled_from(TOKEN_CHOICE), E=st.sampled_from([4, 6]), k=st.integers(1, 3),
       n=st.integers(1, 40), cf=st.one_of(st.none(), st.floats(0.05, 3.0)),
       policy=st.sampled_from(["probs", "position"]), seed=st.integers(0, 2**16))
def test_counts_add_up(router, E, k, n, cf, policy, seed):
    """tokens_per_expert sums to n*k minus the dropped; no expert exceeds C = min(n, ceil(c*n*k/E))."""
    layer = build(router, E, k, seed, capacity_factor=cf, drop_policy=policy)
    K = layer.cfg.top_k
    st_ = layer(tokens(n, seed)).stats
    tpe = st_.tokens_per_expert
    assert tpe.shape == (E,) and (tpe >= 0).all()
    assert int(tpe.sum()) == n * K - int(st_.dropped)
    if cf is None:
        assert int(st_.dropped) == 0
    else:
        C = min(n, math.ceil(cf * n * K / E))
        assert int(tpe.max()) <= C
        # an expert below its capacity dropped nothing, so drops imply some full expert
        if int(st_.dropped) > 0:
            assert int(tpe.max()) == C


@FAST
@given(E=st.sampled_from([4, 6]), k=st.integers(1, 3), n=st.integers(1, 40),
       cf=st.one_of(st.none(), st.floats(0.05, 3.0)), seed=st.integers(0, 2**16))
def test_expert_choice_and_dense_counts(E, k, n, cf, seed):
    ec = build("expert_choice", E, k, seed, capacity_factor=cf).eval()(tokens(n, seed)).stats
    C = min(n, math.ceil((cf if cf is not None else 1.0) * n * k / E))
    assert ec.tokens_per_expert.tolist() == [C] * E and int(ec.dropped) == 0
    de = build("dense", E, k, seed, capacity_factor=cf)(tokens(n, seed)).stats
    assert de.tokens_per_expert.tolist() == [n] * E and int(de.dropped) == 0


def identity_experts(layer: MoELayer) -> MoELayer:
    """relu experts with w_up = w_down = I (H = D): expert(x) = x for x > 0."""
    E = layer.cfg.num_experts
    with torch.no_grad():
        layer.experts.w_up.copy_(torch.eye(D).expand(E, D, D))
        layer.experts.w_down.copy_(torch.eye(D).expand(E, D, D))
    return layer


@FAST
@given(router=st.sampled_from(TOKEN_CHOICE + ["dense", "expert_choice"]), E=st.sampled_from([4, 6]),
       k=st.integers(1, 3), n=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_identity_experts_give_back_the_weighted_input(router, E, k, n, seed):
    layer = identity_experts(build(router, E, k, seed, activation="relu", d_hidden=D))
    cfg = layer.cfg
    x = tokens(n, seed).abs() + 0.05
    logits_TE = x.double() @ layer.router.weight.double().T
    p_TE = logits_TE.softmax(-1)
    K = cfg.top_k
    if router in ("topk", "noisy_topk", "dense"):
        w_T = torch.ones(n, dtype=torch.float64)  # normalised top-k, softmax over chosen, all p
    elif router == "topk_raw":
        w_T = p_TE.topk(K, dim=-1).values.sum(-1)
    elif router == "switch":
        w_T = p_TE.max(-1).values
    elif router.startswith("sigmoid_bias"):
        w_T = torch.full((n,), cfg.routed_scaling_factor, dtype=torch.float64)
    else:  # expert choice: sum over the experts that took the token of its s
        C = min(n, math.ceil(n * K / E))
        taken_TE = torch.zeros(n, E, dtype=torch.bool)
        for e in range(E):
            taken_TE[p_TE[:, e].topk(C).indices, e] = True
        w_T = (p_TE * taken_TE).sum(-1)
    torch.testing.assert_close(layer(x).output.double(), w_T[:, None] * x.double(), rtol=2e-5, atol=1e-6)


@FAST
@given(router=st.sampled_from(TOKEN_CHOICE), E=st.sampled_from([4, 6]), k=st.integers(1, 3),
       n=st.integers(1, 30), cf=st.floats(0.05, 2.0), policy=st.sampled_from(["probs", "position"]),
       seed=st.integers(0, 2**16))
def test_identity_experts_with_drops_scale_each_token(router, E, k, n, cf, policy, seed):
    """With capacity, a token gets back x times the sum of its kept weights, between 0 and the dropless
    sum."""
    layer = identity_experts(build(router, E, k, seed, activation="relu", d_hidden=D, capacity_factor=cf,
                                   drop_policy=policy))
    full = identity_experts(build(router, E, k, seed, activation="relu", d_hidden=D))
    x = tokens(n, seed).abs() + 0.05
    y, y_full = layer(x).output, full(x).output
    ratio_T = y[:, 0] / x[:, 0]
    torch.testing.assert_close(y, ratio_T[:, None] * x, rtol=1e-5, atol=1e-6)
    full_T = y_full[:, 0] / x[:, 0]
    assert (ratio_T >= -1e-6).all() and (ratio_T <= full_T + 1e-5).all()
