"""balance_scope="global": the balance loss's load fractions come from the whole optimizer step. With equal
micro-batches that makes --grad-accum 2 compute exactly the objective of one batch of all the rows, which
the per-micro-batch loss does not: the independent reference is the one-batch step."""
from __future__ import annotations

import pytest
import torch

from moekit.config import ModelConfig, MoEConfig
from moekit.functional.losses import load_balancing_loss
from moekit.nn.transformer import MoETransformer
from moekit.train.accumulate import forward_backward
from moekit.train.runtime import LocalRuntime


def _model(scope: str, router: str = "topk") -> MoETransformer:
    torch.manual_seed(0)
    moe = MoEConfig(d_model=16, d_hidden=24, num_experts=4, top_k=2, router=router, aux_loss_coef=0.5,
                    z_loss_coef=0.0, balance_scope=scope)
    return MoETransformer(ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=32, moe=moe))


def _step(model, x, micro):
    model.zero_grad(set_to_none=True)
    out = forward_backward(model, LocalRuntime(), x, x, micro, lambda *a: RuntimeError(a), model)
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_global_scope_over_two_micro_batches_equals_one_batch():
    x = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(1))
    ref, ref_g = _step(_model("micro_batch").train(), x, 1)
    got, got_g = _step(_model("global").train(), x, 2)
    _, per_g = _step(_model("micro_batch").train(), x, 2)
    assert got.aux_loss == pytest.approx(ref.aux_loss, rel=1e-5) and got.loss == pytest.approx(ref.loss, rel=1e-6)
    for n in ref_g:
        torch.testing.assert_close(got_g[n], ref_g[n], rtol=1e-4, atol=1e-6)
    # the micro-batch scope differs from one batch (so the check can fail): f from half the rows each
    assert any(not torch.allclose(per_g[n], ref_g[n], rtol=1e-4, atol=1e-6) for n in ref_g if "router" in n)


def test_the_counting_pass_gives_the_router_noise_back():
    """noisy_topk: the real forwards draw what they would have drawn without the extra counting forward."""
    x = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    got, _ = _step(_model("global", "noisy_topk").train(), x, 2)
    torch.manual_seed(5)
    per, _ = _step(_model("micro_batch", "noisy_topk").train(), x, 2)
    assert got.loss == per.loss  # the same picks and weights: the LM loss is bit-identical
    for layer in per.stats:
        assert torch.equal(got.stats[layer].tokens_per_expert, per.stats[layer].tokens_per_expert)


def test_the_layer_uses_the_step_counts_it_is_given():
    torch.manual_seed(0)
    model = _model("global").train()
    layer = model.moe_layers()[0]
    h = torch.randn(10, 16)
    counts = torch.tensor([30, 2, 3, 5])
    with layer.global_balance(counts):
        out = layer(h)
    # E * sum_e f_e P_e with f from the given counts and P from this call's router probabilities
    probs = torch.softmax(h @ layer.router.weight.t(), dim=-1)
    want = 4 * ((counts / counts.sum()) * probs.mean(0)).sum()
    assert float(out.stats.balance_loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    plain = layer(h)  # outside the context: this call's own picks
    topk = torch.topk(probs, 2, dim=-1).indices
    assert float(plain.stats.balance_loss.detach()) == pytest.approx(float(load_balancing_loss(probs, topk, 4)), rel=1e-5)


def test_global_scope_needs_a_fixed_top_k_router():
    with pytest.raises(ValueError, match="balance_scope='global' needs the batch-level balance loss"):
        MoEConfig(d_model=8, d_hidden=8, router="expert_choice", balance_scope="global")
