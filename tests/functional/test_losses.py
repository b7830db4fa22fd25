"""Balancing losses as pure functions, on worked examples computed by hand.

Legend: T tokens, E experts, K top-k, B sequences.
"""
from __future__ import annotations

import math

import pytest
import torch

from moekit.losses import (
    expert_bias_update,
    importance_loss,
    load_balancing_loss,
    sequence_balancing_loss,
    z_loss,
)


@pytest.mark.parametrize("E,K", [(4, 1), (4, 2), (8, 2), (6, 3)])
def test_balance_uniform_routing_is_one(E, K):
    T = 2 * E
    probs_TE = torch.full((T, E), 1.0 / E)
    # every expert receives exactly T*K/E assignments
    indices_TK = torch.stack([(torch.arange(T) + j) % E for j in range(K)], dim=1)
    assert torch.bincount(indices_TK.reshape(-1), minlength=E).unique().numel() == 1
    torch.testing.assert_close(load_balancing_loss(probs_TE, indices_TK, E), torch.tensor(1.0))


@pytest.mark.parametrize("E", [2, 4, 8])
def test_balance_total_collapse_is_E(E):
    T = 5
    probs_TE = torch.zeros(T, E)
    probs_TE[:, 1] = 1.0
    indices_TK = torch.ones(T, 1, dtype=torch.long)
    torch.testing.assert_close(load_balancing_loss(probs_TE, indices_TK, E), torch.tensor(float(E)))


def test_balance_by_hand():
    # T=2, E=3, K=2: assignments {0,1} and {0,2}: f = (2/4, 1/4, 1/4); P = mean rows = (0.5, 0.3, 0.2)
    probs_TE = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.3, 0.3]])
    indices_TK = torch.tensor([[0, 1], [0, 2]])
    want = 3 * (0.5 * 0.5 + 0.25 * 0.3 + 0.25 * 0.2)
    torch.testing.assert_close(load_balancing_loss(probs_TE, indices_TK, 3), torch.tensor(want))


def test_balance_gradient_flows_through_probs_only():
    probs_TE = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.3, 0.3]], requires_grad=True)
    load_balancing_loss(probs_TE, torch.tensor([[0, 1], [0, 2]]), 3).backward()
    # d/dP_e of E * sum f_e * mean_t p_te = E * f_e / T
    torch.testing.assert_close(probs_TE.grad, torch.tensor([[0.75, 0.375, 0.375]] * 2))


def test_z_loss_by_hand_2x3():
    logits_TE = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    lse0 = math.log(3.0)
    lse1 = math.log(math.e + math.e**2 + math.e**3)
    torch.testing.assert_close(z_loss(logits_TE), torch.tensor((lse0**2 + lse1**2) / 2))


def test_z_loss_stable_for_large_logits():
    """No overflow for large logits: logsumexp, not log(sum(exp))."""
    logits_TE = torch.tensor([[1000.0, 1000.0]])
    torch.testing.assert_close(z_loss(logits_TE), torch.tensor((1000.0 + math.log(2.0)) ** 2))


def test_importance_by_hand():
    gates_TE = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    # per-expert sums (1.5, 0.5, 0, 0): mean 0.5, population variance (1 + 0 + .25 + .25) / 4 = .375
    torch.testing.assert_close(importance_loss(gates_TE), torch.tensor(0.375 / 0.25))


def test_importance_balanced_is_zero():
    gates_TE = torch.tensor([[0.7, 0.3], [0.3, 0.7]])
    torch.testing.assert_close(importance_loss(gates_TE), torch.tensor(0.0))


def test_sequence_balance_by_hand_two_sequences():
    # E=2, K=1. Sequence 0 = tokens 0,1,2; sequence 1 = tokens 3,4.
    probs_TE = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.5, 0.5], [0.4, 0.6]])
    indices_TK = torch.tensor([[0], [0], [1], [0], [1]])
    seq_T = torch.tensor([0, 0, 0, 1, 1])
    # seq 0: f = (2/3, 1/3), P = (2/3, 1/3)      -> 2 * (4/9 + 1/9)       = 10/9
    # seq 1: f = (1/2, 1/2), P = (0.45, 0.55)    -> 2 * (0.225 + 0.275)   = 1
    want = (10 / 9 + 1.0) / 2
    got = sequence_balancing_loss(probs_TE, indices_TK, seq_T, 2, 2)
    torch.testing.assert_close(got, torch.tensor(want))
    # the batch-level loss on the same routing is different: f = (3/5, 2/5), P = (0.58, 0.42)
    torch.testing.assert_close(load_balancing_loss(probs_TE, indices_TK, 2), torch.tensor(2 * (.348 + .168)))


def test_sequence_balance_tokens_need_not_be_contiguous():
    probs_TE = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    indices_TK = torch.tensor([[0], [0], [0], [1], [1]])
    seq_T = torch.tensor([0, 1, 0, 1, 0])
    perm = torch.tensor([0, 2, 4, 1, 3])
    a = sequence_balancing_loss(probs_TE, indices_TK, seq_T, 2, 2)
    b = sequence_balancing_loss(probs_TE[perm], indices_TK[perm], seq_T[perm], 2, 2)
    torch.testing.assert_close(a, b)


def test_expert_bias_update_signs():
    bias_E = torch.tensor([0.5, 0.0, -0.5, 0.1])
    load_E = torch.tensor([12, 2, 6, 4])  # mean 6: over, under, equal, under
    got = expert_bias_update(bias_E, load_E, 0.1)
    torch.testing.assert_close(got, torch.tensor([0.4, 0.1, -0.5, 0.2]))
    torch.testing.assert_close(bias_E, torch.tensor([0.5, 0.0, -0.5, 0.1]))  # pure: input untouched
