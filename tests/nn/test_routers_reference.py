"""The dynamic, balanced and hierarchical routers (top_p, relu, hierarchical, sinkhorn, base, hash) in
an MoELayer against a naive float64 per-token loop written from their papers' formulas.

Legend: T tokens, n routed tokens, D model dim, E experts, G expert groups.

The reference routes one token at a time with Python lists, applies capacity with explicit per-expert
slot lists, sums the weighted expert outputs (the experts evaluated by the helpers of
test_moe_reference) and recomputes every statistic and loss. It returns the smallest gap it met at a
decision boundary, so a near tie shows up as a data problem, not a false bug.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from moekit import MoEConfig, MoELayer

from .test_moe_reference import HS, MIN_GAP, _close, _expert, _gap, _seed, _shared, _softmax, _top, randomize

D, H = 12, 16
B, S = 2, 11  # n = 22 tokens

ROUTER_CFGS = {
    "top_p": {"router": "top_p", "num_experts": 4, "top_k": 1, "top_p": 0.5},
    "top_p_gt_maxk": {"router": "top_p", "num_experts": 6, "top_k": 1, "top_p": 0.6, "top_p_rule": "gt", "max_k": 3,
                      "entropy_loss_coef": 0.03},
    "relu": {"router": "relu", "num_experts": 4, "top_k": 2, "relu_l1_init": 0.05},
    "hierarchical": {"router": "hierarchical", "num_experts": 6, "top_k": 2, "num_expert_groups": 3,
                     "group_top_k": 2, "aux_loss_coef": 0.1},
    "sinkhorn_k1": {"router": "sinkhorn", "num_experts": 4, "top_k": 1},
    "sinkhorn_k2": {"router": "sinkhorn", "num_experts": 4, "top_k": 2},
    "base": {"router": "base", "num_experts": 4, "top_k": 1},
    "hash": {"router": "hash", "num_experts": 4, "top_k": 1, "hash_vocab_size": 30, "hash_seed": 3},
}
MODES = {"dropless": {}, "position": {"capacity_factor": 0.75, "drop_policy": "position"},
         "probs": {"capacity_factor": 0.75, "drop_policy": "probs"}}
CASES = [(r, m) for r in ROUTER_CFGS for m in MODES]


def make_cfg(router: str, mode: str = "dropless", impl: str = "fused", **extra) -> MoEConfig:
    kw = {"d_model": D, "d_hidden": H, "expert_impl": impl, "importance_loss_coef": 0.05}
    kw.update(ROUTER_CFGS[router])
    kw.update(MODES[mode])
    kw.update(extra)
    return MoEConfig(**kw)


def _sigmoid(a: float) -> float:
    return 1.0 / (1.0 + math.exp(-a))


def _route_top_p(cfg, lg):
    p = _softmax(lg)
    K = cfg.max_k or cfg.num_experts
    order, gap = sorted(range(len(p)), key=lambda e: -p[e]), math.inf
    picks, mass = [], 0.0
    for r, e in enumerate(order[:K]):
        if r + 1 < len(order):  # the rank order (position policy) and who is kept depend on it
            gap = min(gap, _gap(p[e], p[order[r + 1]], True))
        keep = mass < cfg.top_p if cfg.top_p_rule == "ge" else mass <= cfg.top_p
        gap = min(gap, abs(mass - cfg.top_p)) if r else gap
        if not keep and r:
            break
        picks.append((e, p[e]))
        mass += p[e]
    return picks, p, gap


def _route_hierarchical(cfg, lg, outer):
    G, k = cfg.num_expert_groups, cfg.top_k
    e = cfg.num_experts // G
    p_out = _softmax(outer)
    groups, gap = _top(p_out, cfg.group_top_k)
    w_out = [p_out[g] / sum(p_out[j] for j in groups) for g in groups]
    picks = []
    for g, wg in zip(groups, w_out):
        p_in = _softmax(lg[g * e:(g + 1) * e])
        local, gg = _top(p_in, k)
        gap = min(gap, gg)
        picks += [(g * e + j, wg * p_in[j] / sum(p_in[i] for i in local)) for j in local]
    full = [p_out[j // e] * _softmax(lg[(j // e) * e:(j // e + 1) * e])[j % e] for j in range(cfg.num_experts)]
    return picks, full, gap


def _route_token(cfg, lg, outer, token_id, table):
    """-> (picks [(expert, weight)] in rank order, P vector for the stats, smallest gap)."""
    k, p = cfg.top_k, _softmax(lg)
    if cfg.router == "top_p":
        return _route_top_p(cfg, lg)
    if cfg.router == "relu":
        R = [max(a, 0.0) for a in lg]
        s = sum(R)
        order = sorted((e for e in range(len(lg)) if R[e] > 0), key=lambda e: -R[e])  # strongest first
        gap = min([abs(a) for a in lg] + [_gap(R[a], R[b], True) for a, b in zip(order, order[1:])])
        return [(e, R[e]) for e in order], [r / s if s else 0.0 for r in R], gap
    if cfg.router == "hierarchical":
        return _route_hierarchical(cfg, lg, outer)
    if cfg.router == "sinkhorn":  # eval: top-k of the activation
        act = [_sigmoid(a) for a in lg] if k == 1 else p
        idx, gap = _top(act, k, relative=False)
        return [(e, act[e]) for e in idx], p, gap
    if cfg.router == "base":  # eval: greedy top-1
        idx, gap = _top(lg, 1, relative=False)
        return [(idx[0], _sigmoid(lg[idx[0]]))], p, gap
    if cfg.router == "hash":
        return [(table[token_id], 1.0)], [1.0 / len(lg)] * len(lg), math.inf
    raise AssertionError(cfg.router)


def _capacity(cfg, picks):
    """kept[i] = [(expert, weight)], dropped count, smallest gap at a probs-policy cut."""
    n, E = len(picks), cfg.num_experts
    k = cfg.top_k * (cfg.group_top_k if cfg.router == "hierarchical" else 1)
    if cfg.capacity_factor is None:
        return [list(pk) for pk in picks], 0, math.inf
    C = min(n, math.ceil(cfg.capacity_factor * n * k / E))
    slots, dropped, gap = [[] for _ in range(E)], 0, math.inf
    if cfg.drop_policy == "position":
        for r in range(max((len(pk) for pk in picks), default=0)):
            for i in range(n):
                if r < len(picks[i]):
                    e, w = picks[i][r]
                    if len(slots[e]) < C:
                        slots[e].append((i, w))
                    else:
                        dropped += 1
    else:
        for e in range(E):
            cand = sorted([(i, w) for i in range(n) for (ee, w) in picks[i] if ee == e], key=lambda iw: -iw[1])
            if len(cand) > C and cand[C - 1][1] != cand[C][1]:  # exact ties (hash): earlier token first, both
                gap = min(gap, _gap(cand[C - 1][1], cand[C][1], True))
            slots[e], dropped = cand[:C], dropped + len(cand[C:])
    kept = [[] for _ in range(n)]
    for e in range(E):
        for i, w in slots[e]:
            kept[i].append((e, w))
    return kept, dropped, gap


def _balance(cfg, picks, Pv, outer_P):
    E, n = cfg.num_experts, len(picks)
    if cfg.router in ("sinkhorn", "base", "hash") or n == 0:
        return 0.0
    count = [sum(1 for pk in picks for e, _ in pk if e == j) for j in range(E)]
    Pbar = [sum(Pv[i][j] for i in range(n)) / n for j in range(E)]
    if cfg.router == "top_p":
        total = sum(count)
        return E * sum(count[j] / total * Pbar[j] for j in range(E))
    if cfg.router == "relu":
        Rw = [[dict(pk).get(j, 0.0) for j in range(E)] for pk in picks]
        return sum(E * count[j] / (cfg.top_k * n) * sum(Rw[i][j] for i in range(n)) / n for j in range(E))
    # hierarchical: Switch term over groups + mean over groups with tokens of the Switch term inside
    G, gk, k = cfg.num_expert_groups, cfg.group_top_k, cfg.top_k
    e = E // G
    in_g = [[i for i in range(n) if any(j // e == g for j, _ in picks[i])] for g in range(G)]
    outer = G * sum(len(in_g[g]) / (n * gk) * sum(outer_P[i][g] for i in range(n)) / n for g in range(G))
    inner = []
    for g in range(G):
        if in_g[g]:
            m = len(in_g[g])
            inner.append(e * sum(count[g * e + j] / (m * k) * sum(
                _softmax_group(Pv[i], g, e)[j] for i in in_g[g]) / m for j in range(e)))
    return outer + sum(inner) / len(inner)


def _softmax_group(full, g, e):
    block = full[g * e:(g + 1) * e]
    return [v / sum(block) for v in block]


def naive(layer: MoELayer, x: torch.Tensor, token_ids=None) -> dict:
    cfg = layer.cfg
    E = cfg.num_experts
    P = {name: t.detach().double() for name, t in layer.state_dict().items()}
    X = x.detach().double().reshape(-1, D)
    n = X.shape[0]
    ids = [None] * n if token_ids is None else token_ids.reshape(-1).tolist()
    table = P["router.hash_table"].long().tolist() if "router.hash_table" in P else None
    logits = [(P["router.weight"] @ X[t]).tolist() for t in range(n)]
    outer = [(P["router.group_weight"] @ X[t]).tolist() if "router.group_weight" in P else None for t in range(n)]
    picks, Pv, min_gap = [], [], math.inf
    for t in range(n):
        pk, pv, gap = _route_token(cfg, logits[t], outer[t], ids[t], table)
        picks.append(pk)
        Pv.append(pv)
        min_gap = min(min_gap, gap)
    kept, dropped, gap = _capacity(cfg, picks)
    min_gap = min(min_gap, gap)
    out = torch.zeros(n, D, dtype=torch.float64)
    for t in range(n):
        y = _shared(P, cfg, X[t])
        for e, w in kept[t]:
            y = y + w * _expert(P, cfg, e, X[t])
        out[t] = y
    outer_P = [_softmax(o) if o is not None else None for o in outer]
    balance = _balance(cfg, picks, Pv, outer_P)
    z = 0.0 if cfg.router == "hash" else sum(
        (max(lg) + math.log(sum(math.exp(a - max(lg)) for a in lg))) ** 2 for lg in logits) / n
    col = [sum(w for pk in picks for e, w in pk if e == j) for j in range(E)]
    mean = sum(col) / E
    importance = 0.0 if cfg.router == "hash" else (sum((c - mean) ** 2 for c in col) / E) / mean**2  # no aux
    entropy = sum(-sum(a * math.log(a) for a in pv if a > 0) for pv in Pv) / n
    balance_coef = float(P["router.relu_l1"]) if cfg.router == "relu" else cfg.aux_loss_coef
    aux = balance_coef * balance + cfg.z_loss_coef * z + cfg.importance_loss_coef * importance
    if cfg.router == "top_p":
        aux += cfg.entropy_loss_coef * entropy
    return {"output": out.reshape(x.shape), "tokens_per_expert": [sum(1 for kp in kept for e, _ in kp if e == j)
                                                                   for j in range(E)],
            "dropped": dropped, "balance": balance, "z": z, "importance": importance, "aux": aux,
            "entropy": entropy, "experts_per_token": sum(map(len, picks)) / n, "min_gap": min_gap}


def check(layer: MoELayer, x: torch.Tensor, token_ids=None) -> dict:
    ref = naive(layer, x, token_ids)
    assert ref["min_gap"] > MIN_GAP, "test data has a near tie at a routing decision; change the seed"
    out = layer(x, token_ids=token_ids)
    torch.testing.assert_close(out.output.double(), ref["output"], rtol=1e-5, atol=1e-5)
    st = out.stats
    assert st.tokens_per_expert.tolist() == ref["tokens_per_expert"]
    assert int(st.dropped) == ref["dropped"]
    for got, want in ((st.balance_loss, "balance"), (st.z_loss, "z"), (st.importance_loss, "importance"),
                      (out.aux_loss, "aux"), (st.router_entropy, "entropy"), (st.experts_per_token, "experts_per_token")):
        _close(got, ref[want])
    return ref


def _ids(cfg: MoEConfig, seed: int):
    if cfg.router != "hash":
        return None
    return torch.randint(0, cfg.hash_vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("impl", ["fused", "loop"])
@pytest.mark.parametrize("router,mode", CASES, ids=[f"{r}-{m}" for r, m in CASES])
def test_layer_matches_naive_loop(router, mode, impl):
    cfg = make_cfg(router, mode, impl)
    seed = _seed(router, mode, "new")
    layer = randomize(MoELayer(cfg), seed).eval()
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(seed + 1))
    ref = check(layer, x, _ids(cfg, seed))
    if mode != "dropless":
        assert ref["dropped"] > 0, "capacity case should drop something, else it tests nothing"


@pytest.mark.parametrize("router", ["top_p", "relu", "hierarchical", "hash"])
def test_shared_experts_and_gelu_match_naive_loop(router):
    cfg = make_cfg(router, activation="gelu", num_shared_experts=2, shared_d_hidden=HS, shared_gate=True)
    layer = randomize(MoELayer(cfg), _seed(router, "gelu-shared")).eval()
    check(layer, torch.randn(B, S, D, generator=torch.Generator().manual_seed(4)), _ids(cfg, 4))


def _sinkhorn_ref(L: np.ndarray, iters: int = 5000) -> np.ndarray:
    """Log-domain Sinkhorn in numpy, written independently: rows sum to 1/T, columns to 1/E."""
    T, E = L.shape
    f, g = np.zeros(T), np.zeros(E)
    for _ in range(iters):
        f = -np.log(T) - np.logaddexp.reduce(L + g[None, :], axis=1)
        g = -np.log(E) - np.logaddexp.reduce(L + f[:, None], axis=0)
    return np.exp(L + f[:, None] + g[None, :])


@pytest.mark.parametrize("k", [1, 2])
def test_sinkhorn_training_picks_topk_of_sinkhorn(k):
    """Training: experts = top-k of Sinkhorn(exp(l)); weights = sigmoid(l) (k=1) or softmax(l) (k>1)."""
    layer = randomize(MoELayer(make_cfg(f"sinkhorn_k{k}", sinkhorn_tol=1e-6)), _seed("sk", str(k))).train()
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(8))
    P = {n: t.detach().double() for n, t in layer.state_dict().items()}
    L = (x.double().reshape(-1, D) @ P["router.weight"].T).numpy()
    Q = _sinkhorn_ref(L)
    want = torch.zeros(B * S, D, dtype=torch.float64)
    for t in range(B * S):
        order = np.argsort(-Q[t])
        assert (Q[t, order[k - 1]] - Q[t, order[k]]) / Q[t, order[k - 1]] > 1e-4  # no near tie
        act = 1 / (1 + np.exp(-L[t])) if k == 1 else np.exp(L[t] - L[t].max()) / np.exp(L[t] - L[t].max()).sum()
        for e in order[:k]:
            want[t] += float(act[e]) * _expert(P, layer.cfg, int(e), x.double().reshape(-1, D)[t])
    out = layer(x)
    torch.testing.assert_close(out.output.double().reshape(-1, D), want, rtol=1e-5, atol=1e-5)
    assert float(out.stats.balance_loss) == 0.0  # balanced by construction: no balance term


def test_base_training_equals_scipy_assignment_on_replicated_slots():
    """Training: each expert takes exactly T/E tokens; the choice maximises sum_t x_t . w_e(t), as
    scipy's linear_sum_assignment on E x T/E replicated expert slots; weight = sigmoid(x_t . w_e)."""
    layer = randomize(MoELayer(make_cfg("base")), _seed("base", "train")).train()
    x = torch.randn(3, 8, D, generator=torch.Generator().manual_seed(2))
    P = {n: t.detach().double() for n, t in layer.state_dict().items()}
    X = x.double().reshape(-1, D)
    L = (X @ P["router.weight"].T).numpy()
    T, E = L.shape
    rows, cols = linear_sum_assignment(np.repeat(L, T // E, axis=1), maximize=True)
    expert = cols[np.argsort(rows)] // (T // E)
    want = torch.stack([_sigmoid(L[t, expert[t]]) * _expert(P, layer.cfg, int(expert[t]), X[t]) for t in range(T)])
    out = layer(x)
    assert out.stats.tokens_per_expert.tolist() == [T // E] * E
    torch.testing.assert_close(out.output.double().reshape(-1, D), want, rtol=1e-5, atol=1e-5)
    (out.output.sum() + out.aux_loss).backward()
    assert layer.router.weight.grad.abs().sum() > 0  # through the weight sigmoid(x . w_e)


def test_base_training_rejects_a_token_count_not_divisible_by_experts():
    from moekit.functional.routing_balanced import BalancedAssignmentError

    layer = MoELayer(make_cfg("base")).train()
    with pytest.raises(BalancedAssignmentError, match=r"T=22 to be a multiple of num_experts=4"):
        layer(torch.randn(B, S, D))
    # padding is not counted: 22 tokens with 2 masked out route 20 = 5 per expert
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, -2:] = False
    out = layer(torch.randn(B, S, D), token_mask=mask)
    assert out.stats.tokens_per_expert.tolist() == [5, 5, 5, 5]
    assert torch.equal(out.output[1, -2:], torch.zeros(2, D))


def test_hierarchical_with_one_group_equals_flat_topk():
    """One group: the outer gate is 1 and the inner top-k renormalised is Mixtral's top-k; the balance
    term is the flat one plus the outer level's 1."""
    hier = randomize(MoELayer(make_cfg("hierarchical", num_expert_groups=1, group_top_k=1)), 5).eval()
    flat = MoELayer(MoEConfig(d_model=D, d_hidden=H, num_experts=6, top_k=2, importance_loss_coef=0.05)).eval()
    flat.load_state_dict({k: v for k, v in hier.state_dict().items() if k != "router.group_weight"})
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(6))
    a, b = hier(x), flat(x)
    torch.testing.assert_close(a.output, b.output)
    assert torch.equal(a.stats.tokens_per_expert, b.stats.tokens_per_expert)
    torch.testing.assert_close(a.stats.balance_loss, b.stats.balance_loss + 1)
    torch.testing.assert_close(a.stats.router_entropy, b.stats.router_entropy)


def test_hash_layer_needs_token_ids_and_ignores_the_router_weights():
    layer = randomize(MoELayer(make_cfg("hash")), 1).eval()
    x = torch.randn(B, S, D)
    with pytest.raises(ValueError, match=r"token_ids=ids"):
        layer(x)
    ids = _ids(layer.cfg, 2)
    out = layer(x, token_ids=ids)
    (out.output.sum() + out.aux_loss).backward()
    assert layer.router.weight.grad is None  # no router gradient, no aux loss
    assert float(out.aux_loss) == 0.0
    want = [int(layer.router.hash_table[i]) for i in ids.reshape(-1)]
    assert out.stats.tokens_per_expert.tolist() == [want.count(e) for e in range(4)]


@pytest.mark.parametrize("router", ["top_p", "relu", "hierarchical", "sinkhorn_k2", "base", "hash"])
def test_nan_token_propagates(router):
    layer = randomize(MoELayer(make_cfg(router, "position")), _seed(router, "nan")).eval()
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(9))
    x[1, 4, 3] = float("nan")
    assert torch.isnan(layer(x, token_ids=_ids(layer.cfg, 9)).output[1, 4]).all()


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("router", ["top_p", "relu", "hierarchical", "sinkhorn_k2", "base", "hash"])
def test_padding_is_neither_routed_nor_counted(router, train):
    """A token_mask leaves the real tokens' outputs, losses and stats equal to routing them alone, and
    the padding outputs exactly 0 (also where training balances over the real tokens: sinkhorn, base)."""
    layer = randomize(MoELayer(make_cfg(router, "probs")), _seed(router, "pad")).train(train)
    x = torch.randn(2, 11, D, generator=torch.Generator().manual_seed(3))
    ids = None if layer.cfg.router != "hash" else torch.randint(0, 30, (2, 11), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, 0] = mask[1, 10] = False  # 20 real of 22 rows: base balances the 20 (22 is no multiple of 4)
    x_pad = torch.where(mask.unsqueeze(-1), x, float("nan"))
    got = layer(x_pad, token_mask=mask, token_ids=ids)
    want = layer(x[mask].unsqueeze(0), token_ids=None if ids is None else ids[mask].unsqueeze(0))
    torch.testing.assert_close(got.output[mask], want.output[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(got.output[~mask], torch.zeros(int((~mask).sum()), D))
    assert torch.equal(got.stats.tokens_per_expert, want.stats.tokens_per_expert)
    assert int(got.stats.num_tokens) == int(mask.sum())
    torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.stats.experts_per_token, want.stats.experts_per_token)


def test_relu_token_with_no_active_expert_outputs_zero():
    layer = randomize(MoELayer(make_cfg("relu")), 2).eval()
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # token 1 scores every expert below 0
        layer.router.weight[:] = -x[1] / x[1].norm() * torch.linspace(1, 2, 4).unsqueeze(1)
    out = layer(x)
    assert (x[1] @ layer.router.weight.T < 0).all()
    assert torch.equal(out.output[1], torch.zeros(D))
    assert float(out.stats.experts_per_token) == pytest.approx(
        float((x @ layer.router.weight.T > 0).sum()) / 3)
