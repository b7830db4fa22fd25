"""The pure functions of the dynamic, balanced and hierarchical routers on hand-worked cases and
independent references (scipy's assignment solver, a numpy Sinkhorn, brute force).

Legend: T tokens, E experts, K columns per token, G groups.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from moekit import MoEConfig
from moekit.functional.routing_balanced import (
    BalancedAssignmentError,
    SinkhornError,
    balanced_assignment,
    balanced_hash_table,
    hash_table,
    sinkhorn_log,
)
from moekit.functional.routing_dynamic import (
    dynamic_balancing_loss,
    hierarchical_route,
    relu_l1_loss,
    relu_l1_update,
    relu_route,
    top_p_route,
)

P4 = torch.tensor([[0.5, 0.25, 0.125, 0.125]], dtype=torch.float64)


def _kept(p: float, rule: str, max_k=None) -> set[int]:
    r = top_p_route(P4.log(), p, rule=rule, max_k=max_k)
    return {int(e) for e, a in zip(r.indices_TK[0], r.active_TK[0]) if a}


@pytest.mark.parametrize("p,rule,want", [(0.4, "ge", {0}), (0.6, "ge", {0, 1}), (0.5, "ge", {0}),
                                         (0.5, "gt", {0, 1}), (0.4, "gt", {0}), (0.6, "gt", {0, 1}),
                                         (1.0, "ge", {0, 1, 2, 3})])
def test_top_p_hand_worked(p, rule, want):
    """P = [.5, .25, .125, .125]: p = .4 -> {0}; .6 -> {0, 1}; .5 -> {0} reaching it, {0, 1} exceeding it."""
    assert _kept(p, rule) == want


def test_top_p_weights_are_raw_probabilities_and_max_k_caps():
    r = top_p_route(P4.log(), 0.9, max_k=2)
    assert r.indices_TK.tolist() == [[0, 1]] and r.active_TK.tolist() == [[True, True]]
    torch.testing.assert_close(r.weights_TK, torch.tensor([[0.5, 0.25]], dtype=torch.float64))  # not renormalised
    r = top_p_route(P4.log(), 0.6)
    torch.testing.assert_close(r.weights_TK, torch.tensor([[0.5, 0.25, 0, 0]], dtype=torch.float64))


def test_dynamic_balance_counts_active_assignments_only():
    # token 0 keeps {0}, token 1 keeps {0, 1}: f = [2/3, 1/3], P = mean of the two rows
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1]], dtype=torch.float64)
    r = top_p_route(probs.log(), 0.6)
    assert r.active_TK.sum(1).tolist() == [1, 2]
    want = 3 * (2 / 3 * 0.6 + 1 / 3 * 0.3)
    torch.testing.assert_close(dynamic_balancing_loss(r.probs_TE, r.indices_TK, r.active_TK, 3),
                               torch.tensor(want, dtype=torch.float64))
    mask = torch.tensor([True, False])  # padding row 1 left out: f = [1, 0], P = row 0
    torch.testing.assert_close(dynamic_balancing_loss(r.probs_TE, r.indices_TK, r.active_TK, 3, mask),
                               torch.tensor(3 * 0.7, dtype=torch.float64))


def test_relu_regulariser_hand_worked():
    """R = [[1, 0], [3, 0]], E = 2, k = 1: f = [2, 0], mean_t R = [2, 0] -> L_reg / lambda = 4."""
    R = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    assert float(relu_l1_loss(R, k=1)) == 4.0
    r = relu_route(torch.tensor([[1.0, -2.0], [3.0, -0.5]], dtype=torch.float64))
    assert r.active_TK.sum().item() == 2 and r.weights_TK[:, 0].tolist() == [1.0, 3.0]


def test_relu_lambda_sequence():
    """Sparsities .3, .3, .9 against target .5: 1e-8 -> 1.2e-8 -> 1.44e-8 -> 1.2e-8, kept in fp32."""
    l1 = torch.tensor(1e-8, dtype=torch.float32)
    seen = []
    for s in (0.3, 0.3, 0.9):
        l1 = relu_l1_update(l1, s, 0.5, 1.2)
        seen.append(float(l1))
    assert l1.dtype == torch.float32
    np.testing.assert_allclose(seen, [1.2e-8, 1.44e-8, 1.2e-8], rtol=1e-6)


def test_hierarchical_route_brute_force():
    torch.manual_seed(0)
    outer, inner = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    r = hierarchical_route(outer, inner, group_k=2, k=1)
    for t in range(5):
        po = outer[t].softmax(0)
        groups = po.argsort(descending=True)[:2]
        want = {}
        for g in groups.tolist():
            pi = inner[t, 2 * g:2 * g + 2].softmax(0)
            j = int(pi.argmax())
            want[2 * g + j] = float(po[g] / po[groups].sum())  # inner renormalised over one pick = 1
        got = {int(e): float(w) for e, w in zip(r.indices_TK[t], r.weights_TK[t])}
        assert got.keys() == want.keys()
        for e in want:
            assert got[e] == pytest.approx(want[e], rel=1e-12)
    torch.testing.assert_close(r.probs_TE.sum(1), torch.ones(5, dtype=torch.float64))


def _sinkhorn_np(L: np.ndarray, iters: int = 3000) -> np.ndarray:
    """Written independently of moekit: scaling vectors u, v in the log domain."""
    T, E = L.shape
    log_u, log_v = np.zeros(T), np.zeros(E)
    for _ in range(iters):
        log_u = np.log(1 / T) - np.log(np.exp(L + log_v - (L + log_v).max(1, keepdims=True)).sum(1)) - (
            L + log_v).max(1)
        log_v = np.log(1 / E) - np.log(np.exp((L.T + log_u) - (L.T + log_u).max(1, keepdims=True)).sum(1)) - (
            L.T + log_u).max(1)
    return np.exp(L + log_u[:, None] + log_v[None, :])


def test_sinkhorn_marginals_and_agreement_with_a_reference():
    """Rows sum to 1/T, columns to 1/E, and Q equals a numpy Sinkhorn written here."""
    L = torch.randn(12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    Q = sinkhorn_log(L, tol=1e-10, max_iter=100000).exp()
    torch.testing.assert_close(Q.sum(1), torch.full((12,), 1 / 12, dtype=torch.float64), rtol=1e-8, atol=0)
    torch.testing.assert_close(Q.sum(0), torch.full((4,), 1 / 4, dtype=torch.float64), rtol=1e-8, atol=0)
    np.testing.assert_allclose(Q.numpy(), _sinkhorn_np(L.numpy()), rtol=1e-6, atol=1e-12)


def test_sinkhorn_large_logits_in_fp32():
    """exp(l) overflows fp32 here; the log domain still meets the tolerance on every column."""
    L = torch.randn(12, 4, generator=torch.Generator().manual_seed(1)) * 100
    assert torch.isinf(L.exp()).any()
    Q = sinkhorn_log(L, tol=1e-3, max_iter=100000).exp()
    assert torch.isfinite(Q).all()
    assert float((Q.sum(0) * 4 - 1).abs().max()) <= 1e-3 and float((Q.sum(1) * 12 - 1).abs().max()) < 1e-4


def test_sinkhorn_named_errors():
    L = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(SinkhornError, match="sinkhorn_max_iter=1 iterations"):
        sinkhorn_log(L * 50, max_iter=1, tol=1e-12)
    L[2, 1] = float("nan")
    with pytest.raises(SinkhornError, match="NaN or inf"):
        sinkhorn_log(L)


@pytest.mark.parametrize("T,E,seed", [(8, 2, 0), (12, 4, 1), (24, 3, 2), (40, 8, 3), (16, 16, 4)])
def test_balanced_assignment_equals_scipy_on_replicated_slots(T, E, seed):
    a = np.random.default_rng(seed).normal(size=(T, E))
    got = balanced_assignment(a)
    assert np.bincount(got, minlength=E).tolist() == [T // E] * E
    rows, cols = linear_sum_assignment(np.repeat(a, T // E, axis=1), maximize=True)
    want = cols[np.argsort(rows)] // (T // E)
    assert got.tolist() == want.tolist()
    assert a[np.arange(T), got].sum() == pytest.approx(a[np.arange(T), want].sum(), abs=1e-12)


def test_balanced_assignment_named_error():
    with pytest.raises(BalancedAssignmentError, match="T=10 to be a multiple of num_experts=4"):
        balanced_assignment(np.zeros((10, 4)))


def test_hash_tables():
    t = hash_table(1000, 4, seed=7)
    assert torch.equal(t, hash_table(1000, 4, seed=7)) and not torch.equal(t, hash_table(1000, 4, seed=8))
    assert t.min() >= 0 and t.max() == 3 and min(torch.bincount(t).tolist()) > 200  # uniform-ish
    counts = torch.tensor([50, 1, 1, 30, 20, 10, 5, 3])
    table = balanced_hash_table(counts, 2)
    load = [int(counts[table == e].sum()) for e in range(2)]
    assert sorted(load) == [60, 60]  # 50+10 vs 30+20+5+3+1+1
    # balanced beats the random table by far on a Zipf-like count
    zipf = (1000 / torch.arange(1, 201)).long()
    for tab, worst in ((balanced_hash_table(zipf, 4), 1.02), (hash_table(200, 4, 0), math.inf)):
        loads = torch.zeros(4, dtype=torch.long).index_add(0, tab, zipf)
        assert float(loads.max() / loads.float().mean()) <= worst


@pytest.mark.parametrize("kw,msg", [
    ({"router": "top_p", "top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
    ({"router": "top_p", "top_p_rule": "lt"}, r"top_p_rule='lt'"),
    ({"router": "top_p", "max_k": 9}, r"max_k=9 must be in \[1, num_experts=8\]"),
    ({"router": "relu", "relu_l1_multiplier": 1.0}, r"relu_l1_multiplier=1.0 must be > 1"),
    ({"router": "relu", "relu_l1_init": 0.0}, r"relu_l1_init=0.0 must be > 0"),
    ({"router": "hierarchical", "num_expert_groups": 3}, r"num_expert_groups=3 must divide num_experts=8"),
    ({"router": "hierarchical", "num_expert_groups": 2, "group_top_k": 3}, r"group_top_k=3 must be in \[1, num_expert_groups=2\]"),
    ({"router": "hierarchical", "num_expert_groups": 4, "top_k": 3}, r"top_k=3 .* num_expert_groups=2\]"),
    ({"router": "sinkhorn", "sinkhorn_tol": 0}, r"sinkhorn_tol=0 must be > 0"),
    ({"router": "base", "top_k": 2}, r"router='base' routes each token to one expert: top_k=2 must be 1"),
    ({"router": "hash", "top_k": 2}, r"router='hash' .* top_k=2 must be 1"),
    ({"router": "soft", "slots_per_expert": 0}, r"slots_per_expert=0 must be an integer >= 1"),
])
def test_config_errors_name_field_value_and_range(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MoEConfig(d_model=8, d_hidden=8, num_experts=8, **kw)
