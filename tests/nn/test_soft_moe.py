"""Soft MoE (router="soft"): dispatch and combine sums, permutation equivariance within a sequence, the
constant-logit case, padding, and the whole layer against a float64 loop over groups and slots.

Legend: B groups (sequences), M tokens per group, D model dim, E experts, s slots per expert, N = E * s.
"""
from __future__ import annotations

import math

import torch

from moekit import MoEConfig, MoELayer
from moekit.functional.routing_soft import soft_dispatch_combine, soft_logits

from .test_moe_reference import _expert, randomize

D, H, E, SLOTS = 6, 8, 3, 2


def _layer(**kw) -> MoELayer:
    cfg = MoEConfig(d_model=D, d_hidden=H, num_experts=E, router="soft", slots_per_expert=SLOTS, **kw)
    return randomize(MoELayer(cfg), 3).double()


def _naive(layer: MoELayer, x_BMD: torch.Tensor) -> torch.Tensor:
    """Per group: logits from L2-normalised x and phi (times the scale), softmax over tokens for each
    slot, softmax over slots for each token; slots = dispatch-weighted sums of the raw tokens."""
    P = {n: t.detach().double() for n, t in layer.state_dict().items()}
    phi, scale = P["router.weight"], float(P["router.soft_scale"])
    out = torch.zeros_like(x_BMD, dtype=torch.float64)
    for b in range(x_BMD.shape[0]):
        X = x_BMD[b].double()
        M, N = X.shape[0], phi.shape[0]
        lg = [[scale * float(X[m] @ phi[n]) / math.sqrt(float(X[m] @ X[m]) + 1e-6)
               / math.sqrt(float(phi[n] @ phi[n]) + 1e-6) for n in range(N)] for m in range(M)]
        disp = [[math.exp(lg[m][n]) / sum(math.exp(lg[j][n]) for j in range(M)) for n in range(N)] for m in range(M)]
        comb = [[math.exp(lg[m][n]) / sum(math.exp(v) for v in lg[m]) for n in range(N)] for m in range(M)]
        slot_out = [_expert(P, layer.cfg, n // SLOTS, sum(disp[m][n] * X[m] for m in range(M))) for n in range(N)]
        for m in range(M):
            out[b, m] = sum(comb[m][n] * slot_out[n] for n in range(N))
    return out


def test_layer_matches_naive_loop_per_sequence():
    layer = _layer()
    x = torch.randn(2, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = layer(x)
    torch.testing.assert_close(out.output, _naive(layer, x), rtol=1e-10, atol=1e-10)
    assert out.stats.tokens_per_expert.tolist() == [2 * SLOTS] * E  # B * s slots per expert
    assert float(out.aux_loss) == 0.0
    # sequences are separate groups: changing sequence 1 leaves sequence 0 alone
    x2 = x.clone()
    x2[1] += 1
    torch.testing.assert_close(layer(x2).output[0], out.output[0], rtol=0, atol=0)


def test_dispatch_and_combine_sums():
    logits = torch.randn(2, 5, E * SLOTS, dtype=torch.float64)
    disp, comb = soft_dispatch_combine(logits)
    torch.testing.assert_close(disp.sum(1), torch.ones(2, E * SLOTS, dtype=torch.float64))
    torch.testing.assert_close(comb.sum(2), torch.ones(2, 5, dtype=torch.float64))
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    disp, comb = soft_dispatch_combine(logits, mask)
    torch.testing.assert_close(disp.sum(1), torch.ones(2, E * SLOTS, dtype=torch.float64))
    assert torch.equal(disp[1, 2:], torch.zeros(3, E * SLOTS, dtype=torch.float64))


def test_permutation_equivariance_within_a_sequence():
    layer = _layer()
    x = torch.randn(1, 7, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(layer(x[:, perm]).output, layer(x).output[:, perm], rtol=1e-12, atol=1e-12)


def test_constant_logits_average_every_token():
    """scale = 0 makes every logit 0: each slot is the mean token and every output the mean over the
    slots of the expert outputs."""
    layer = _layer()
    with torch.no_grad():
        layer.router.soft_scale.zero_()
    x = torch.randn(1, 4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    logits = soft_logits(x, layer.router.weight, layer.router.soft_scale)
    assert torch.equal(logits, torch.zeros_like(logits))
    P = {n: t.detach().double() for n, t in layer.state_dict().items()}
    mean_x = x[0].mean(0)
    want = sum(_expert(P, layer.cfg, n // SLOTS, mean_x) for n in range(E * SLOTS)) / (E * SLOTS)
    torch.testing.assert_close(layer(x).output[0], want.expand(4, D), rtol=1e-12, atol=1e-12)


def test_padding_is_ignored_and_outputs_zero():
    layer = _layer()
    x = torch.randn(2, 6, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    x_pad = x.clone()
    x_pad[1, 4:] = float("nan")
    out = layer(x_pad, token_mask=mask).output
    torch.testing.assert_close(out[1, :4], layer(x[1:, :4]).output[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(out[1, 4:], torch.zeros(2, D, dtype=torch.float64))


def test_not_causal_a_later_token_changes_earlier_outputs():
    """Documented: a slot mixes the whole sequence, so Soft MoE does not suit a decoder."""
    layer = _layer()
    x = torch.randn(1, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    x2 = x.clone()
    x2[0, -1] += 1
    assert not torch.allclose(layer(x2).output[0, 0], layer(x).output[0, 0])
