"""Gradients: gradcheck of a small float64 layer per router and mode, and fused vs loop backward.

Legend: T tokens, D model dim, E experts, H expert hidden.

Routing decisions are piecewise constant, so the finite differences of gradcheck only see the smooth
part (weights, experts, shared experts); random float64 data keeps every decision away from a tie.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.gradcheck import GradcheckError
from torch.func import functional_call

from moekit import MoEConfig, MoELayer

D, H = 5, 6
T = 8

CASES = {
    "topk": {"router": "topk", "top_k": 2},
    "topk_raw_cap_probs": {"router": "topk", "top_k": 2, "norm_topk": False, "capacity_factor": 0.7},
    "switch_shared": {"router": "switch", "top_k": 1, "num_shared_experts": 1, "shared_d_hidden": 4},
    "switch_cap_position": {"router": "switch", "top_k": 1, "capacity_factor": 0.7,
                            "drop_policy": "position"},
    "noisy_topk": {"router": "noisy_topk", "top_k": 2},
    "noisy_topk_cap_position": {"router": "noisy_topk", "top_k": 2, "capacity_factor": 0.7,
                                "drop_policy": "position"},
    "sigmoid_bias": {"router": "sigmoid_bias", "top_k": 2, "routed_scaling_factor": 1.7},
    "sigmoid_bias_group_gated": {"router": "sigmoid_bias", "top_k": 2, "n_group": 2, "topk_group": 1,
                                 "num_shared_experts": 2, "shared_d_hidden": 3, "shared_gate": True},
    # options: null + zero-computation experts beside a capacity limit; DeepSeek-V2 device / comm losses
    "topk_null_zero_compute": {"router": "topk", "top_k": 2, "num_null_experts": 1, "num_zero_experts": 1,
                               "num_copy_experts": 1, "num_constant_experts": 1, "capacity_factor": 0.9},
    "sigmoid_bias_device_comm": {"router": "sigmoid_bias", "top_k": 2, "n_group": 2, "topk_group": 1,
                                 "num_devices": 2, "device_loss_coef": 0.3, "comm_loss_coef": 0.2,
                                 "group_score": "max"},
    "expert_choice": {"router": "expert_choice", "top_k": 2},
    "expert_choice_cap_gelu": {"router": "expert_choice", "top_k": 1, "capacity_factor": 1.3,
                               "activation": "gelu"},
    "dense": {"router": "dense"},
    "dense_gelu_shared_gated": {"router": "dense", "activation": "gelu", "num_shared_experts": 1,
                                "shared_d_hidden": 4, "shared_gate": True},
    # the dynamic, balanced and hierarchical routers (sinkhorn and base in eval: top-k of the activation)
    "top_p_entropy": {"router": "top_p", "top_k": 1, "top_p": 0.6, "entropy_loss_coef": 0.1},
    "relu_cap": {"router": "relu", "top_k": 2, "relu_l1_init": 0.1, "capacity_factor": 0.9},
    "hierarchical": {"router": "hierarchical", "top_k": 1, "num_expert_groups": 2, "group_top_k": 2},
    "sinkhorn_k2": {"router": "sinkhorn", "top_k": 2},
    "base": {"router": "base", "top_k": 1},
    "soft": {"router": "soft", "slots_per_expert": 2},
}


def make_layer(case: str, impl: str, dtype=torch.float64, seed: int = 0) -> MoELayer:
    kw = {"d_model": D, "d_hidden": H, "num_experts": 4, "expert_impl": impl, "importance_loss_coef": 0.1}
    kw.update(CASES[case])
    layer = MoELayer(MoEConfig(**kw)).to(dtype).eval()  # eval: noisy_topk without noise
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            scale = 1.0 if name.startswith("router.") else 1.0 / math.sqrt(p.shape[-1])
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.copy_(torch.randn(4, generator=g, dtype=torch.float64) * 0.3)
    return layer


def as_function(layer: MoELayer, x: torch.Tensor, which: str):
    """A function of the one tensor ``which`` ("x" or a parameter name) -> (output, aux_loss); the
    layer's parameters are substituted with torch.func.functional_call."""
    params = {n: p.detach() for n, p in layer.named_parameters()}

    def f(t):
        ps = dict(params)
        inp = x
        if which == "x":
            inp = t
        else:
            ps[which] = t
        out = functional_call(layer, ps, (inp,))
        return out.output, out.aux_loss

    start = x if which == "x" else params[which]
    return f, start.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("impl", ["fused", "loop"])
@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck_float64(case, impl):
    """gradcheck for the input and every parameter, one tensor at a time so that a failure names the
    tensor (and gradcheck's slow-mode error report stays small)."""
    layer = make_layer(case, impl)
    x = torch.randn(T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    failed = []
    for which in ["x", *(n for n, _ in layer.named_parameters())]:
        f, t = as_function(layer, x, which)
        torch.manual_seed(0)  # fast mode draws random projections: keep them fixed
        try:
            torch.autograd.gradcheck(f, (t,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)
        except GradcheckError as e:
            failed.append(f"{which}: {str(e).splitlines()[0]}")
    assert not failed, "gradcheck failed for:\n" + "\n".join(failed)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_and_loop_gradients_agree(case):
    """The fused op has a hand-written backward: it must match autograd through the loop reference."""
    grads = {}
    for impl in ("fused", "loop"):
        layer = make_layer(case, impl, dtype=torch.float32, seed=3)
        x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(4), requires_grad=True)
        out = layer(x)
        up = torch.randn(out.output.shape, generator=torch.Generator().manual_seed(5))
        ((out.output * up).sum() + 10 * out.aux_loss).backward()
        grads[impl] = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    assert grads["fused"].keys() == grads["loop"].keys()
    for name, g_loop in grads["loop"].items():
        g_fused = grads["fused"][name]
        if g_loop is None:  # e.g. w_noise in eval mode: no gradient on either side
            assert g_fused is None or not g_fused.any(), name
            continue
        assert g_fused is not None, name
        torch.testing.assert_close(g_fused, g_loop, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_expert_bias_gets_no_gradient():
    """sigmoid_bias: the bias only chooses experts, it is a buffer and never part of the graph."""
    layer = make_layer("sigmoid_bias", "fused", dtype=torch.float32)
    assert "router.expert_bias" in dict(layer.named_buffers())
    assert "router.expert_bias" not in dict(layer.named_parameters())
    x = torch.randn(T, D)
    out = layer(x)
    assert not layer.router.expert_bias.requires_grad
    (out.output.sum() + out.aux_loss).backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
