"""Options on the existing routers as pure functions, on examples worked by hand: the group score, the
three bias updates, DeepSeek-V2's device and communication losses, null experts' weights, the
global-batch balance loss.

Legend: T tokens, E experts, K top-k, D devices.
"""
from __future__ import annotations

import math

import pytest
import torch

from moekit import MoEConfig
from moekit.functional.bias_update import bias_step, centered_sign_bias_update, quantile_bias_target
from moekit.functional.losses import load_balancing_loss
from moekit.functional.losses_device import comm_balance_loss, device_balance_loss
from moekit.functional.losses_global import global_balancing_loss
from moekit.functional.routing import sigmoid_bias_route, topk_route
from moekit.functional.routing_extra import extra_topk_route


def _logit(p: list[list[float]]) -> torch.Tensor:
    t = torch.tensor(p, dtype=torch.float64)
    return torch.log(t / (1 - t))


# -- group score ------------------------------------------------------------------------------------
# sigmoid scores: group 0 = experts {0, 1} = [.9, .1] (best single, sum 1.0); group 1 = [.6, .55] (sum 1.15)
GROUPS = _logit([[0.9, 0.1, 0.6, 0.55]])


@pytest.mark.parametrize("group_score,top,k,want", [
    ("sum_top", 2, 1, [2]),  # 1.15 > 1.0: group 1, its best expert
    ("max", 2, 1, [0]),  # .9 > .6: group 0 (DeepSeek-V2 group_limited_greedy)
    ("sum_top", 1, 1, [0]),  # the top-1 sum is the max
    ("sum_top", 2, 2, [2, 3]),
    ("max", 2, 2, [0, 1]),
])
def test_group_score_by_hand(group_score, top, k, want):
    r = sigmoid_bias_route(GROUPS, torch.zeros(4), k, n_group=2, topk_group=1, group_score=group_score,
                           group_top=top)
    assert r.indices_TK[0].tolist() == want


@pytest.mark.parametrize("k,tg,n_group,E,want", [(8, 4, 8, 256, 2), (2, 1, 2, 6, 2), (3, 2, 3, 6, 2),
                                                 (1, 1, 2, 4, 1), (3, 1, 2, 8, 3), (6, 4, 8, 16, 2)])
def test_sum_top_counts_ceil_k_over_m(k, tg, n_group, E, want):
    """DeepSeek-V3 (K=8, M=4) sums 2; K/M not an integer rounds up. Configs with 1 < K/M <= 2 keep the
    old hard-coded 2; K/M <= 1 now sums 1 (the group's best), K/M > 2 more than 2."""
    cfg = MoEConfig(d_model=4, d_hidden=4, router="sigmoid_bias", num_experts=E, top_k=k, n_group=n_group,
                    topk_group=tg)
    assert cfg.group_top == want
    assert cfg.replace(group_score_top=1).group_top == 1


def test_group_score_top_is_validated():
    with pytest.raises(ValueError, match=r"group_score_top=3 must be in \[1, num_experts / n_group=2\]"):
        MoEConfig(d_model=4, d_hidden=4, router="sigmoid_bias", num_experts=4, n_group=2, group_score_top=3)
    with pytest.raises(ValueError, match="group_score='best' is unknown"):
        MoEConfig(d_model=4, d_hidden=4, group_score="best")


# -- bias updates on loads [5, 1, 1, 1] ---------------------------------------------------------------
LOADS = torch.tensor([5, 1, 1, 1])


def test_sign_and_centered_bias_updates_by_hand():
    b = torch.zeros(4, dtype=torch.float64)
    # mean load 2: expert 0 over, the rest under
    torch.testing.assert_close(bias_step("sign", b, LOADS, 0.1), torch.tensor([-0.1, 0.1, 0.1, 0.1], dtype=b.dtype))
    # the step (-.1, .1, .1, .1) minus its mean .05
    want = torch.tensor([-0.15, 0.05, 0.05, 0.05], dtype=b.dtype)
    torch.testing.assert_close(bias_step("sign_centered", b, LOADS, 0.1), want)
    torch.testing.assert_close(centered_sign_bias_update(b + 1, LOADS, 0.1), want + 1)
    assert float(bias_step("sign_centered", b, LOADS, 0.1).sum()) == pytest.approx(0, abs=1e-15)


# 8 tokens, E = 4, k = 1: the argmax loads are [5, 1, 1, 1]
SCORES = torch.tensor([[0.9, 0.5, 0.3, 0.2], [0.8, 0.3, 0.6, 0.1], [0.7, 0.2, 0.1, 0.6], [0.9, 0.6, 0.2, 0.3],
                       [0.8, 0.1, 0.5, 0.4], [0.3, 0.9, 0.2, 0.1], [0.2, 0.3, 0.8, 0.4], [0.4, 0.2, 0.1, 0.7]],
                      dtype=torch.float64)


def test_quantile_bias_update_by_hand():
    """alpha_t = each row's 2nd best = (.5, .6, .6, .6, .5, .3, .4, .4). Expert 0's gaps alpha_t - s_t0, sorted:
    (-.4, -.3, -.3, -.2, -.1, 0, 0, .2); the 1/4 quantile sits at position 1.75 -> -.3. Experts 1-3 -> 0.
    b = (-.3, 0, 0, 0) minus its mean -.075."""
    assert torch.bincount(SCORES.argmax(1), minlength=4).tolist() == LOADS.tolist()
    b = torch.zeros(4, dtype=torch.float64)
    target = quantile_bias_target(SCORES, b, 1)
    torch.testing.assert_close(target, torch.tensor([-0.225, 0.075, 0.075, 0.075], dtype=b.dtype))
    torch.testing.assert_close(bias_step("quantile", b, LOADS, 0.1, target), target)
    # re-routing with it: the overloaded expert sheds two tokens
    assert torch.bincount((SCORES + target).argmax(1), minlength=4).tolist() == [3, 1, 2, 2]
    with pytest.raises(ValueError, match="quantile.*bias target"):
        bias_step("quantile", b, LOADS, 0.1)


def test_quantile_bias_ignores_padding():
    pad = torch.cat([SCORES, torch.full((3, 4), 0.5, dtype=torch.float64)])
    mask = torch.tensor([True] * 8 + [False] * 3)
    torch.testing.assert_close(quantile_bias_target(pad, torch.zeros(4, dtype=torch.float64), 1, mask),
                               quantile_bias_target(SCORES, torch.zeros(4, dtype=torch.float64), 1))


# -- device and communication losses ----------------------------------------------------------------
PROBS = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.5, 0.2, 0.2]], dtype=torch.float64)  # P = (.4, .3, .15, .15)


def test_device_and_comm_loss_by_hand_top1():
    """E=4 on D=2 devices {0,1}, {2,3}; picks 0 and 1: f = 4 c / (1 * 2) = (2, 2, 0, 0).
    L_dev = mean(2, 2) * (.4 + .3) + 0 = 1.4; f''(M=1) = 2 / 2 * (2, 0): L_comm = 2 * .7 = 1.4."""
    idx = torch.tensor([[0], [1]])
    torch.testing.assert_close(device_balance_loss(PROBS, idx, 4, 2), torch.tensor(1.4, dtype=torch.float64))
    torch.testing.assert_close(comm_balance_loss(PROBS, idx, 4, 2, 1), torch.tensor(1.4, dtype=torch.float64))


def test_device_and_comm_loss_by_hand_top2():
    """Picks {0, 2} and {1, 0}: c = (2, 1, 1, 0), f = 4 c / (2 * 2) = (2, 1, 1, 0).
    L_dev = 1.5 * .7 + .5 * .3 = 1.2. Devices reached: token 0 both, token 1 device 0 -> (2, 1);
    f''(M=2) = 2 / (2 * 2) * (2, 1) = (1, .5): L_comm = .7 + .15 = .85."""
    idx = torch.tensor([[0, 2], [1, 0]])
    torch.testing.assert_close(device_balance_loss(PROBS, idx, 4, 2), torch.tensor(1.2, dtype=torch.float64))
    torch.testing.assert_close(comm_balance_loss(PROBS, idx, 4, 2, 2), torch.tensor(0.85, dtype=torch.float64))
    # a padding row changes nothing
    pad = torch.cat([PROBS, torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64)])
    idx_pad, mask = torch.cat([idx, torch.tensor([[0, 1]])]), torch.tensor([True, True, False])
    torch.testing.assert_close(device_balance_loss(pad, idx_pad, 4, 2, mask), torch.tensor(1.2, dtype=torch.float64))
    torch.testing.assert_close(comm_balance_loss(pad, idx_pad, 4, 2, 2, mask), torch.tensor(0.85, dtype=torch.float64))


def test_device_and_comm_loss_are_one_when_uniform():
    E, D, K, T = 8, 4, 2, 8
    probs = torch.full((T, E), 1 / E, dtype=torch.float64)
    idx = torch.stack([torch.arange(T) % E, (torch.arange(T) + 4) % E], dim=1)  # 2 devices per token, even
    torch.testing.assert_close(device_balance_loss(probs, idx, E, D), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(comm_balance_loss(probs, idx, E, D, K), torch.tensor(1.0, dtype=torch.float64))


def test_device_loss_gradient_is_f_over_T():
    """d L_dev / d p_tj = mean_{i in d(j)} f_i / T."""
    probs = PROBS.clone().requires_grad_(True)
    device_balance_loss(probs, torch.tensor([[0], [1]]), 4, 2).backward()
    torch.testing.assert_close(probs.grad, torch.tensor([[1.0, 1.0, 0, 0]] * 2, dtype=torch.float64))


# -- null experts -------------------------------------------------------------------------------------
def test_extra_route_without_extras_is_topk_bit_for_bit():
    logits = torch.randn(9, 6, generator=torch.Generator().manual_seed(0))
    for normalize in (True, False):
        a, b = extra_topk_route(logits, 2, 6, 0, normalize=normalize), topk_route(logits, 2, normalize=normalize)
        assert torch.equal(a.indices_TK, b.indices_TK) and torch.equal(a.weights_TK, b.weights_TK)


def test_null_weights_renormalise_over_true_experts():
    """E=2 routed, N=2 null (ids 2, 3). p = softmax(l); a token's null picks weigh 0, the rest sum to 1."""
    logits = torch.tensor([[math.log(4.0), 0.0, math.log(3.0), math.log(2.0)],  # p = (.4, .1, .3, .2)
                           [0.0, 0.0, 5.0, 5.0]], dtype=torch.float64)  # picks both nulls
    r = extra_topk_route(logits, 2, 2, 2, normalize=True)
    assert r.indices_TK.tolist() == [[0, 2], [2, 3]]
    torch.testing.assert_close(r.weights_TK, torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    raw = extra_topk_route(logits, 2, 2, 2, normalize=False)
    torch.testing.assert_close(raw.weights_TK[0], torch.tensor([0.4, 0.0], dtype=torch.float64))
    assert r.probs_TE.shape == (2, 4)  # the balance loss sees all E + N


# -- global-batch balance -----------------------------------------------------------------------------
def test_global_balance_on_two_micro_batches_by_hand():
    """E=2, K=1. Micro-batch 1 sends both tokens to expert 0 with p = (.9, .1); micro-batch 2 both to
    expert 1 with p = (.1, .9). Per micro-batch f = (1, 0) / (0, 1): 2 * .9 = 1.8 each. The step's counts
    (2, 2) give f = (.5, .5): 2 * (.45 + .05) = 1.0 each."""
    p1 = torch.tensor([[0.9, 0.1], [0.9, 0.1]], dtype=torch.float64)
    p2 = p1.flip(1)
    i1, i2 = torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long)
    for p, i in ((p1, i1), (p2, i2)):
        torch.testing.assert_close(load_balancing_loss(p, i, 2), torch.tensor(1.8, dtype=torch.float64))
    counts = torch.bincount(torch.cat([i1, i2]).reshape(-1), minlength=2)
    for p in (p1, p2):
        torch.testing.assert_close(global_balancing_loss(p, counts, 2), torch.tensor(1.0, dtype=torch.float64))
    # one micro-batch on one rank: the global loss is the micro-batch loss
    torch.testing.assert_close(global_balancing_loss(p1, torch.bincount(i1.reshape(-1), minlength=2), 2),
                               load_balancing_loss(p1, i1, 2))
    # padding is left out of P
    pad, mask = torch.cat([p1, torch.tensor([[0.0, 1.0]], dtype=torch.float64)]), torch.tensor([True, True, False])
    torch.testing.assert_close(global_balancing_loss(pad, counts, 2, mask), torch.tensor(1.0, dtype=torch.float64))


def test_device_losses_need_a_fixed_k_router():
    with pytest.raises(ValueError, match=r"num_devices=2: .* not router='dense'"):
        MoEConfig(d_model=4, d_hidden=4, router="dense", num_devices=2)
    with pytest.raises(ValueError, match="num_devices=3 must be an integer >= 1 dividing num_experts=8"):
        MoEConfig(d_model=4, d_hidden=4, num_devices=3)
