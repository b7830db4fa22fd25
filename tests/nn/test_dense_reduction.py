"""Reductions to the dense case (MegaBlocks habit), the bias update, and training-only randomness.

Legend: T tokens, D model dim, E experts, H expert hidden.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit import MoEConfig, MoELayer

D, H = 8, 12


def dense_ffn(x_TD, w_gate_HD, w_up_HD, w_down_DH, activation):
    """A plain dense FFN built from torch.nn.functional, independent of moekit."""
    if activation == "swiglu":
        return F.linear(F.silu(F.linear(x_TD, w_gate_HD)) * F.linear(x_TD, w_up_HD), w_down_DH)
    act = {"gelu": F.gelu, "relu": F.relu}[activation]
    return F.linear(act(F.linear(x_TD, w_up_HD)), w_down_DH)


def randomize(layer: MoELayer, seed: int = 0) -> MoELayer:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            scale = 1.0 if name.startswith("router.") else 1.0 / math.sqrt(p.shape[-1])
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return layer


ONE_EXPERT = {
    "topk": {"router": "topk"},
    "switch": {"router": "switch"},
    "noisy_topk": {"router": "noisy_topk"},
    "sigmoid_bias": {"router": "sigmoid_bias"},
    "expert_choice": {"router": "expert_choice"},
    "dense": {"router": "dense"},
}


@pytest.mark.parametrize("impl", ["fused", "loop"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("router", list(ONE_EXPERT))
def test_one_expert_top1_is_a_dense_ffn(router, activation, impl):
    """E=1, top_k=1: every token goes to the one expert with weight 1 = a dense FFN."""
    cfg = MoEConfig(d_model=D, d_hidden=H, num_experts=1, top_k=1, activation=activation, expert_impl=impl,
                    **ONE_EXPERT[router])
    layer = randomize(MoELayer(cfg)).eval()
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(1))
    ex = layer.experts
    want = dense_ffn(x, ex.w_gate[0] if ex.w_gate is not None else None, ex.w_up[0], ex.w_down[0], activation)
    out = layer(x)
    torch.testing.assert_close(out.output, want, rtol=1e-5, atol=1e-6)
    assert out.stats.tokens_per_expert.tolist() == [15]
    assert int(out.stats.dropped) == 0
    if router not in ("expert_choice", "dense"):
        torch.testing.assert_close(out.stats.balance_loss, torch.tensor(1.0))  # f = P = 1, E = 1


@pytest.mark.parametrize("impl", ["fused", "loop"])
@pytest.mark.parametrize("router,k", [("topk", 2), ("topk", 4), ("noisy_topk", 3), ("sigmoid_bias", 2),
                                      ("dense", 2)])
def test_identical_experts_are_a_dense_ffn(router, k, impl):
    """E experts with the same weights and combine weights summing to 1 = one dense FFN."""
    cfg = MoEConfig(d_model=D, d_hidden=H, num_experts=4, top_k=k, router=router, expert_impl=impl)
    layer = randomize(MoELayer(cfg)).eval()
    with torch.no_grad():
        for w in (layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down):
            w.copy_(w[0:1].expand_as(w))
    x = torch.randn(17, D, generator=torch.Generator().manual_seed(2))
    ex = layer.experts
    want = dense_ffn(x, ex.w_gate[0], ex.w_up[0], ex.w_down[0], "swiglu")
    torch.testing.assert_close(layer(x).output, want, rtol=1e-5, atol=1e-6)


def test_shared_experts_only_add_the_dense_mlp():
    """The shared MLP's hidden size is num_shared_experts * shared_d_hidden; the gate is sigmoid(g . x)."""
    base = {"d_model": D, "d_hidden": H, "num_experts": 4, "top_k": 2}
    cfg = MoEConfig(**base, num_shared_experts=3, shared_d_hidden=5, shared_gate=True)
    layer = randomize(MoELayer(cfg)).eval()
    mlp = layer.shared_experts.mlp
    assert mlp.up_proj.weight.shape == (15, D) and mlp.gate_proj.weight.shape == (15, D)
    assert mlp.down_proj.weight.shape == (D, 15)
    plain = MoELayer(MoEConfig(**base)).eval()
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared_")})
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(3))
    shared = dense_ffn(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, "swiglu")
    shared = torch.sigmoid(x @ layer.shared_experts.gate.weight.T) * shared
    torch.testing.assert_close(layer(x).output, plain(x).output + shared, rtol=1e-5, atol=1e-6)


# -- aux-loss-free balancing ------------------------------------------------------------------------
def test_update_expert_bias_signs():
    cfg = MoEConfig(d_model=D, d_hidden=H, num_experts=4, top_k=2, router="sigmoid_bias",
                    bias_update_rate=0.01)
    layer = MoELayer(cfg)
    layer.update_expert_bias(torch.tensor([10, 0, 5, 5]))  # mean load 5
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    layer.update_expert_bias(torch.tensor([10, 0, 5, 5]))
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.02, 0.02, 0.0, 0.0]))
    layer.update_expert_bias(torch.tensor([0, 1, 2, 9]))  # mean 3
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.01, 0.03, 0.01, -0.01]))


def test_update_expert_bias_balances_the_load():
    """Repeated updates from the layer's own stats move load off the overloaded experts."""
    cfg = MoEConfig(d_model=D, d_hidden=H, num_experts=4, top_k=2, router="sigmoid_bias",
                    bias_update_rate=0.02)
    layer = randomize(MoELayer(cfg), seed=4).eval()
    with torch.no_grad():
        layer.router.weight[0] += 1.5  # expert 0 wins for tokens with positive features
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(5)).abs()
    load0 = layer(x).stats.tokens_per_expert.float()
    for _ in range(150):
        out = layer(x)
        before = layer.router.expert_bias.clone()
        layer.update_expert_bias(out.stats.tokens_per_expert)
        moved = layer.router.expert_bias - before
        load = out.stats.tokens_per_expert.float()
        assert torch.equal(torch.sign(moved), torch.sign(load.mean() - load))
    load1 = layer(x).stats.tokens_per_expert.float()
    assert load1.max() - load1.min() < load0.max() - load0.min()
    assert layer.router.expert_bias[0] < 0


# -- training-only randomness -----------------------------------------------------------------------
def identity_layer(**kw) -> MoELayer:
    """relu experts with w_up = w_down = I (H = D): expert(x) = x for x > 0."""
    cfg = MoEConfig(d_model=D, d_hidden=D, num_experts=4, activation="relu", **kw)
    layer = randomize(MoELayer(cfg), seed=6)
    with torch.no_grad():
        layer.experts.w_up.copy_(torch.eye(D).expand(4, D, D))
        layer.experts.w_down.copy_(torch.eye(D).expand(4, D, D))
    return layer


def test_noisy_topk_training_noise():
    layer = identity_layer(router="noisy_topk", top_k=2)
    with torch.no_grad():
        layer.router.w_noise.copy_(torch.randn(4, D, generator=torch.Generator().manual_seed(7)) * 5)
    x = torch.rand(200, D, generator=torch.Generator().manual_seed(8)) + 0.1
    layer.eval()
    ev1, ev2 = layer(x), layer(x)
    assert torch.equal(ev1.stats.tokens_per_expert, ev2.stats.tokens_per_expert)  # no noise in eval
    layer.train()
    tr1, tr2 = layer(x), layer(x)
    # noisy choices differ from eval and between calls...
    assert not torch.equal(tr1.stats.tokens_per_expert, ev1.stats.tokens_per_expert)
    assert not torch.equal(tr1.stats.tokens_per_expert, tr2.stats.tokens_per_expert)
    # ...but are still k distinct experts per token whose weights sum to 1 (identity experts give x)
    assert int(tr1.stats.tokens_per_expert.sum()) == 2 * 200
    torch.testing.assert_close(tr1.output, x, rtol=1e-5, atol=1e-6)


def test_noisy_topk_vanishing_noise_equals_eval():
    """softplus(x . w_noise) ~ 0 when x > 0 and w_noise << 0: training routes like eval."""
    layer = identity_layer(router="noisy_topk", top_k=2)
    with torch.no_grad():
        layer.router.w_noise.fill_(-20.0)
        layer.experts.w_down.mul_(torch.arange(1.0, 5.0).view(4, 1, 1))  # distinguishable experts
    x = torch.rand(50, D, generator=torch.Generator().manual_seed(9)) + 0.5
    ev = layer.eval()(x)
    tr = layer.train()(x)
    assert torch.equal(ev.stats.tokens_per_expert, tr.stats.tokens_per_expert)
    torch.testing.assert_close(tr.output, ev.output, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router", ["topk", "switch", "sigmoid_bias"])
def test_router_jitter_only_in_training(router):
    kw = {"router": router, "top_k": 1 if router == "switch" else 2}
    jit = identity_layer(router_jitter=0.3, **kw)
    ref = identity_layer(**kw)
    with torch.no_grad():
        for layer in (jit, ref):
            layer.experts.w_down.mul_(torch.arange(1.0, 5.0).view(4, 1, 1))
    x = torch.rand(100, D, generator=torch.Generator().manual_seed(10)) + 0.1
    torch.testing.assert_close(jit.eval()(x).output, ref.eval()(x).output)
    torch.manual_seed(0)
    a = jit.train()(x)
    b = ref.train()(x)
    assert not torch.allclose(a.output, b.output)
