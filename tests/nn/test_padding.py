"""token_mask: padding is not routed, not computed, outputs exactly 0 and is left out of every loss and stat.

Legend: T tokens (padding included), n real tokens, D model dim, E experts, B sequences, S sequence length.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moekit import MoEConfig, MoELayer

D, H, E = 10, 14, 4

ROUTERS = {
    "topk": {"router": "topk", "top_k": 2},
    "switch": {"router": "switch", "top_k": 1},
    "noisy_topk": {"router": "noisy_topk", "top_k": 2},
    "sigmoid_bias": {"router": "sigmoid_bias", "top_k": 2, "n_group": 2, "topk_group": 1},
    "expert_choice": {"router": "expert_choice", "top_k": 2},
    "dense": {"router": "dense"},
}
MODES = {
    "dropless": {},
    "position": {"capacity_factor": 0.6, "drop_policy": "position"},
    "probs": {"capacity_factor": 0.6, "drop_policy": "probs"},
}
CASES = [(r, m) for r in ROUTERS for m in MODES if not (r in ("expert_choice", "dense") and m == "probs")]
IDS = [f"{r}-{m}" for r, m in CASES]


def make_layer(router: str, mode: str, seed: int = 0, **extra) -> MoELayer:
    kw = {"d_model": D, "d_hidden": H, "num_experts": E, "importance_loss_coef": 0.1, "num_shared_experts": 1,
          "shared_d_hidden": 6}
    kw.update(ROUTERS[router])
    kw.update(MODES[mode])
    kw.update(extra)
    layer = MoELayer(MoEConfig(**kw)).eval()  # eval: noisy_topk deterministic
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            scale = 1.0 if name.startswith("router.") else 1.0 / math.sqrt(p.shape[-1])
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.copy_(torch.randn(E, generator=g) * 0.3)
    return layer


def assert_same_losses_and_stats(a, b):
    torch.testing.assert_close(a.aux_loss, b.aux_loss, rtol=1e-5, atol=1e-7)
    for f in dataclasses.fields(a.stats):
        va, vb = getattr(a.stats, f.name), getattr(b.stats, f.name)
        if isinstance(va, torch.Tensor) and va.is_floating_point():
            torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-7, msg=lambda m, n=f.name: f"{n}: {m}")
        elif va is None or isinstance(va, tuple):  # an option not configured / the kinds of extra experts
            assert va == vb, (f.name, va, vb)
        else:
            assert torch.equal(torch.as_tensor(va), torch.as_tensor(vb)), (f.name, va, vb)


def _garbage(n: int, seed: int) -> torch.Tensor:
    """Padding content: huge values, and a NaN and an inf, that must never reach anything."""
    g = torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 1e4
    g[0, 0] = float("nan")
    g[-1, 1] = float("inf")
    return g


@pytest.mark.parametrize("router,mode", CASES, ids=IDS)
def test_appended_padding_changes_nothing(router, mode):
    layer = make_layer(router, mode)
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(1))
    ref = layer(x)
    x_pad = torch.cat([x, _garbage(7, 2)])
    mask = torch.arange(27) < 20
    out = layer(x_pad, token_mask=mask)
    torch.testing.assert_close(out.output[:20], ref.output, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.output[20:], torch.zeros(7, D)), "padding outputs must be exactly 0"
    assert out.stats.num_tokens == 20
    assert_same_losses_and_stats(out, ref)


@pytest.mark.parametrize("router,mode", CASES, ids=IDS)
def test_interleaved_padding_equals_removing_it(router, mode):
    """Padding anywhere (in (B, S, D) form) = the same call on the real tokens alone, in order."""
    layer = make_layer(router, mode, seed=3)
    x = torch.randn(3, 9, D, generator=torch.Generator().manual_seed(4))
    mask = torch.rand(3, 9, generator=torch.Generator().manual_seed(5)) > 0.3
    x = torch.where(mask[..., None], x, torch.full_like(x, 1e4))
    out = layer(x, token_mask=mask)
    ref = layer(x[mask])  # (n, D): same token order as the flattened input
    torch.testing.assert_close(out.output[mask], ref.output, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.output[~mask], torch.zeros(int((~mask).sum()), D))
    assert_same_losses_and_stats(out, ref)


@pytest.mark.parametrize("router", list(ROUTERS))
def test_padding_gets_no_gradient(router):
    layer = make_layer(router, "dropless", seed=6)
    x = torch.randn(12, D, generator=torch.Generator().manual_seed(7))
    x[9:] = 1e4
    x.requires_grad_(True)
    mask = torch.arange(12) < 9
    out = layer(x, token_mask=mask)
    (out.output.pow(2).sum() + out.aux_loss).backward()
    assert torch.equal(x.grad[9:], torch.zeros(3, D))
    assert torch.isfinite(x.grad).all() and x.grad[:9].abs().sum() > 0


@pytest.mark.parametrize("router", list(ROUTERS))
def test_all_padding(router):
    layer = make_layer(router, "position", seed=8)
    x = torch.randn(2, 5, D)
    out = layer(x, token_mask=torch.zeros(2, 5, dtype=torch.bool))
    assert torch.equal(out.output, torch.zeros(2, 5, D))
    assert float(out.aux_loss) == 0.0
    assert out.stats.tokens_per_expert.tolist() == [0] * E and int(out.stats.dropped) == 0


@pytest.mark.parametrize("mode", ["dropless", "position", "probs"])
@pytest.mark.parametrize("router", ["topk", "switch", "noisy_topk", "sigmoid_bias"])
def test_sequence_aux_ignores_padding(router, mode):
    """(B, S, D) + seq_aux: padding at the end of one sequence leaves the sequence-level loss as if
    that sequence were simply shorter. Dropless: each sequence's balance term is the balance term of a
    call on that sequence alone, so the loss is the mean of those."""
    layer = make_layer(router, mode, seed=9, seq_aux=True, aux_loss_coef=0.1)
    x = torch.randn(2, 8, D, generator=torch.Generator().manual_seed(10))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False  # sequence 1 has 5 real tokens
    x_pad = torch.where(mask[..., None], x, torch.full_like(x, -3e3))
    out = layer(x_pad, token_mask=mask)
    # the same tokens, the padding replaced by other padding of a longer sequence layout
    x_long = torch.cat([x_pad, torch.full((2, 3, D), 7e3)], dim=1)
    mask_long = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    out_long = layer(x_long, token_mask=mask_long)
    assert_same_losses_and_stats(out_long, out)
    torch.testing.assert_close(out_long.output[:, :8], out.output)
    if mode == "dropless":
        b0 = layer(x[0:1]).stats.balance_loss
        b1 = layer(x[1:2, :5]).stats.balance_loss
        torch.testing.assert_close(out.stats.balance_loss, (b0 + b1) / 2, rtol=1e-5, atol=1e-7)
        # and differs from the batch-level loss (else the test would not tell them apart)
        flat = make_layer(router, mode, seed=9, aux_loss_coef=0.1)(x_pad, token_mask=mask)
        assert not torch.allclose(flat.stats.balance_loss, out.stats.balance_loss)
