"""Gradient reduction and clipping for expert parallel x data parallel with replicated parameters.

The fallback of ``DistributedRuntime(fsdp=False)`` (``--no-fsdp``): every rank keeps full copies of the
non-expert parameters and their optimizer state. It is what a model with a 0-d parameter (the soft
router's ``soft_scale``) needs, which FSDP2 cannot shard, and code that wants plain full tensors on every
rank; the default is FSDP2 sharding (fsdp.py).

Each rank's loss is the mean over its own tokens, and the global objective is the mean of the N ranks'
losses (= the loss of the global batch when ranks hold equal token counts). So:

- a non-expert parameter, replicated on all N ranks: grad = all_reduce_sum(world) / N;
- an expert parameter: its local gradient already sums the contributions of every rank of its EP
  group (the all-to-all brought their tokens' gradients home); the other contributions sit on its
  data-parallel replicas, so grad = all_reduce_sum(dp group) / N — divided by the *world* size, not
  by the dp size.

Plain ``all_reduce`` on flattened buffers (one per kind), every rank with the same layout.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.nn.moe import expert_parameter_ids
from moekit.parallel.groups import ParallelGroups, collective

__all__ = ["clip_grad_norm_", "split_parameters", "sync_gradients"]


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(replicated parameters, expert-parallel parameters), each in model order, trainable only."""
    experts = expert_parameter_ids(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) not in experts], [p for p in params if id(p) in experts]


def _all_reduce_grads(params: list[nn.Parameter], group: Any, scale: float, what: str) -> None:
    if not params:
        return
    # a parameter without a gradient on this rank still takes part (as zeros): same layout everywhere
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    if group is not None:
        collective(what, lambda: dist.all_reduce(flat, group=group))
    flat.mul_(scale)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def sync_gradients(model: nn.Module, groups: ParallelGroups) -> None:
    """Average gradients for the global objective (see the module docstring)."""
    replicated, experts = split_parameters(model)
    N = groups.world_size
    _all_reduce_grads(replicated, None if N == 1 else dist.group.WORLD, 1.0 / N, "gradient all-reduce")
    _all_reduce_grads(experts, None if groups.dp_size == 1 else groups.dp_group, 1.0 / N,
                      "expert gradient all-reduce over data-parallel replicas")


def clip_grad_norm_(model: nn.Module, max_norm: float, groups: ParallelGroups | None) -> float:
    """Clip by the norm of the *whole* model's gradient (experts summed over the EP group); return it.

    The same formula as ``torch.nn.utils.clip_grad_norm_``: scale = min(1, max_norm / (norm + 1e-6)).
    """
    replicated, experts = split_parameters(model)

    def sq(ps: list[nn.Parameter]) -> Tensor:
        return sum((p.grad.double().pow(2).sum() for p in ps if p.grad is not None), torch.zeros((), dtype=torch.float64))

    expert_sq = sq(experts).reshape(1)
    if groups is not None and groups.ep_size > 1 and experts:
        collective("gradient-norm all-reduce", lambda: dist.all_reduce(expert_sq, group=groups.ep_group))
    norm = math.sqrt(float(sq(replicated)) + float(expert_sq))
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        for p in replicated + experts:
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm
