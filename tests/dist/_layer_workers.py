"""Spawned-rank workers comparing the expert-parallel MoELayer with the single-process layer.

Legend: n_r tokens of rank r, D model dim, E experts, W ranks, L = E / W local experts.

Every rank builds, from the same seed, the single-process layer (all E experts) and the EP layer (its
L experts), and draws every rank's batch from one generator, so it can compute the whole reference
itself: the reference runs the single-process layer on each rank's batch separately (capacity is
applied per rank's own batch, exactly like the EP layer) and sums the losses; its gradients are the
ones the EP layer must reproduce — expert grads slice by slice, router/shared grads summed over ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from moekit import MoEConfig, MoELayer
from moekit.parallel import shard_moe_layer

D, H, E, K = 8, 12, 8, 2

ROUTERS = {
    "topk": {"router": "topk", "top_k": K},
    "switch": {"router": "switch", "top_k": 1},
    "noisy_topk": {"router": "noisy_topk", "top_k": K},
    "sigmoid_bias": {"router": "sigmoid_bias", "top_k": K},
    "expert_choice": {"router": "expert_choice", "top_k": K},
    "dense": {"router": "dense", "top_k": K},
    # the dynamic, balanced and hierarchical token-choice routers (sinkhorn and base in eval mode)
    "top_p": {"router": "top_p", "top_k": 1, "top_p": 0.5},
    "relu": {"router": "relu", "top_k": K, "relu_l1_init": 0.1},
    "hierarchical": {"router": "hierarchical", "top_k": 1, "num_expert_groups": 2, "group_top_k": 2},
    "sinkhorn": {"router": "sinkhorn", "top_k": K},
    "base": {"router": "base", "top_k": 1},
    # options: null and zero-computation experts stay on the token's rank; DeepSeek-V2 device / comm losses
    "topk_null_zero_compute": {"router": "topk", "top_k": K, "num_null_experts": 1, "num_copy_experts": 1,
                               "num_constant_experts": 1},
    "sigmoid_bias_devices": {"router": "sigmoid_bias", "top_k": K, "num_devices": 2, "device_loss_coef": 0.1,
                             "comm_loss_coef": 0.1},
}
MODES = {
    "dropless": {},
    "capacity_probs": {"capacity_factor": 0.75, "drop_policy": "probs"},
    "capacity_position": {"capacity_factor": 0.75, "drop_policy": "position"},
}
EXTRAS = {  # variations run with topk, dropless
    "shared": {"num_shared_experts": 1, "shared_d_hidden": 6},
    "gelu_loop": {"activation": "gelu", "expert_impl": "loop"},
}


def cases() -> list[tuple[str, str]]:
    out = [(r, m) for r in ROUTERS for m in MODES if not (r in ("expert_choice", "dense") and m != "dropless")]
    return out + [("topk", x) for x in EXTRAS] + [("topk", "masked")]


def make_cfg(router: str, mode: str) -> MoEConfig:
    kw = dict(ROUTERS[router]) | MODES.get(mode, {}) | EXTRAS.get(mode, {})
    return MoEConfig(d_model=D, d_hidden=H, num_experts=E, **kw)


def tokens_of(rank: int, world: int) -> int:
    """Ranks hold different numbers of tokens; the last rank of a 4-rank group holds none."""
    return [7, 12, 5, 0][rank] if world == 4 else [9, 14][rank]


def _one_case(rank: int, world: int, router: str, mode: str) -> dict[str, float]:
    cfg = make_cfg(router, mode)
    torch.manual_seed(1)
    ref = MoELayer(cfg)
    torch.manual_seed(1)
    ep = shard_moe_layer(MoELayer(cfg), dist.group.WORLD)
    L = E // world
    sl = slice(rank * L, (rank + 1) * L)
    # the EP layer built from the same seed holds exactly its slice of the reference's experts
    for name in ("w_gate", "w_up", "w_down"):
        if getattr(ref.experts, name) is not None:
            assert torch.equal(getattr(ep.experts, name), getattr(ref.experts, name)[sl]), name
    ref.double().eval()
    ep.double().eval()
    if ref.router.expert_bias is not None:
        bias = torch.randn(E, generator=torch.Generator().manual_seed(5)) * 0.05
        ref.router.expert_bias.copy_(bias)
        ep.router.expert_bias.copy_(bias)
    gen = torch.Generator().manual_seed(7)
    masked = mode == "masked"
    xs, gs, masks = [], [], []
    for r in range(world):
        n = tokens_of(r, world)
        shape = (1, n, D) if masked else (n, D)
        xs.append(torch.randn(shape, generator=gen, dtype=torch.float64))
        gs.append(torch.randn(shape, generator=gen, dtype=torch.float64))
        masks.append(torch.rand(shape[:-1], generator=gen) > 0.3 if masked else None)
    # reference: every rank's batch through the single-process layer, losses summed
    ref_x = [x.clone().requires_grad_() for x in xs]
    ref_out = [ref(x, token_mask=m) for x, m in zip(ref_x, masks)]
    sum((o.output * g).sum() for o, g in zip(ref_out, gs)).backward()
    # expert parallel: this rank's batch only
    x = xs[rank].clone().requires_grad_()
    out = ep(x, token_mask=masks[rank])
    (out.output * gs[rank]).sum().backward()

    err: dict[str, float] = {}

    def diff(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        err[name] = float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0

    diff("output", out.output, ref_out[rank].output)
    diff("x.grad", x.grad, ref_x[rank].grad)
    diff("tokens_per_expert", out.stats.tokens_per_expert, ref_out[rank].stats.tokens_per_expert)
    diff("dropped", out.stats.dropped, ref_out[rank].stats.dropped)
    diff("aux_loss", out.aux_loss, ref_out[rank].aux_loss)
    ref_params = dict(ref.named_parameters())
    for name, p in ep.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        rg = ref_params[name].grad if ref_params[name].grad is not None else torch.zeros_like(ref_params[name])
        if name.startswith("experts."):
            diff(name + ".grad", g, rg[sl])
        else:  # replicated: the sum over ranks of the local grads is the grad of the summed loss
            g = g.clone()
            dist.all_reduce(g)
            diff(name + ".grad", g, rg)
    # the meter saw traffic in both directions (the 0-token rank receives; W=1 would send nothing)
    m = ep.dispatcher.meter
    err["_calls"] = m.calls
    return err


def layer_parity(rank: int, world: int) -> dict[str, dict[str, float]]:
    torch.set_default_dtype(torch.float32)
    return {f"{r}-{m}": _one_case(rank, world, r, m) for r, m in cases()}
