"""FSDP2 (``fully_shard``) composed with expert parallelism on the (dp, ep) DeviceMesh.

Legend: N ranks, ep the expert-parallel size, dp = N / ep, E experts per layer, L = E / ep local ones.

Who shards what (torchtitan's ``dp_shard_mod_ep`` idea):
- a non-expert parameter is one tensor for the whole world: ``fully_shard`` over all N ranks (a 1-D
  mesh of the world), rows ``Shard(0)``;
- an expert parameter (L, ...) after :func:`apply_expert_parallel` is already split over the EP group;
  the ``dp`` ranks that hold the same L experts shard it further: ``fully_shard`` over the mesh's ``dp``
  dimension.

Wrapping is per block: the routed experts of a block first (their own group, on the dp mesh), then the
block (its attention, norms, router, shared experts, on the world mesh), then the root (embedding, final
norm, head). Forward gathers one block at a time; backward reduce-scatters each block's gradients as
soon as they are ready, overlapping the next block's backward on devices with streams.

Gradient scale. The objective is the mean of the N ranks' losses. FSDP divides a reduced gradient by the
size of the mesh it reduces over: N for non-expert parameters (right), dp for experts, whose local
gradient already sums the tokens of the whole EP group (the all-to-all brought them home), so their
divide factor is set to N instead.

The all-to-all dispatcher is unchanged: it talks over the ``ep`` group and never sees FSDP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.nn.moe import MoELayer, expert_parallel_layers
from moekit.parallel.groups import ParallelGroups, collective

__all__ = ["FSDPLayout", "apply_fsdp", "clip_grad_norm_dtensor_", "dtype_from_name", "local_bytes"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_from_name(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} must be one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclass
class FSDPLayout:
    """The meshes of an FSDP2 + EP model: parameters live on ``world_mesh`` / ``dp_mesh``; checkpoints
    describe expert shards on ``ckpt_mesh`` (ep, dp) as rows of the global (E, ...) tensor."""

    groups: ParallelGroups
    world_mesh: Any  # 1-D, all N ranks: non-expert parameters
    dp_mesh: Any  # 1-D, the dp ranks holding the same experts: expert parameters
    ckpt_mesh: Any  # 2-D (ep, dp): [Shard(0), Shard(0)] = EP rows, then FSDP rows inside them


def _meshes(groups: ParallelGroups, device_type: str) -> tuple[Any, Any]:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    N, ep = groups.world_size, groups.ep_size
    world_mesh = init_device_mesh(device_type, (N,), mesh_dim_names=("world",))
    # the same ranks as groups.mesh, transposed: rank = dp_rank * ep + ep_rank
    grid = torch.arange(N).view(N // ep, ep).t().contiguous()
    ckpt_mesh = DeviceMesh(device_type, grid, mesh_dim_names=("ep", "dp"))
    return world_mesh, ckpt_mesh


def apply_fsdp(model: nn.Module, groups: ParallelGroups, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = None, device_type: str = "cpu") -> FSDPLayout:
    """``fully_shard`` ``model`` (experts already sharded by apply_expert_parallel, if ep > 1); collective.

    ``param_dtype``: the dtype parameters are gathered in for forward/backward (sharded master weights
    and the optimizer stay in their own dtype); ``reduce_dtype``: the dtype gradients are reduced in.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    scalars = [n for n, p in model.named_parameters() if p.dim() == 0]
    if scalars:  # the case FSDP2 cannot express (it shards dim 0), hence the replicated fallback
        raise ValueError(f"FSDP2 cannot shard 0-d parameters ({', '.join(scalars[:3])}); train this model "
                         "with --no-fsdp (replicated parameters, all-reduced gradients)")
    world_mesh, ckpt_mesh = collective("creating the FSDP meshes", lambda: _meshes(groups, device_type))
    dp_mesh = groups.mesh["dp"]
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .layers: apply_fsdp wraps a model's blocks one by one")
    ep_layers = {id(m) for m in expert_parallel_layers(model)}
    for block in layers:
        for m in block.modules():
            if isinstance(m, MoELayer) and id(m) in ep_layers:
                fully_shard(m.experts, mesh=dp_mesh, mp_policy=mp)
                m.experts.set_gradient_divide_factor(float(groups.world_size))
                # a custom factor is NCCL's PreMulSum by default, which gloo lacks: SUM, then scale.
                # Not on a 1-rank mesh: there FSDP skips the collective and divides by the factor itself,
                # and forcing SUM would divide a second time (torch 2.13)
                m.experts.set_force_sum_reduction_for_comms(groups.dp_size > 1)
        fully_shard(block, mesh=world_mesh, mp_policy=mp)
    # the root's gathered parameters (embedding, head) are needed again at once by the backward
    fully_shard(model, mesh=world_mesh, mp_policy=mp, reshard_after_forward=False)
    return FSDPLayout(groups, world_mesh, dp_mesh, ckpt_mesh)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def clip_grad_norm_dtensor_(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip by the global norm of sharded gradients; return the norm. Collective over the world.

    Every element of every gradient is held by exactly one rank (non-experts: a Shard(0) slice over the
    world; experts: a Shard(0) slice over dp of this EP rank's experts), so the squared norm is the world
    sum of each rank's local squares: one all-reduce, whatever mix of meshes the parameters live on
    (``torch.nn.utils.clip_grad_norm_`` refuses DTensors on different meshes).
    The same formula as torch: scale = min(1, max_norm / (norm + 1e-6)).
    """
    sq = torch.zeros(1, dtype=torch.float64)
    for p in params:
        if p.grad is not None:
            sq += _local(p.grad).double().pow(2).sum()
    collective("gradient-norm all-reduce", lambda: dist.all_reduce(sq))
    norm = math.sqrt(float(sq))
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                _local(p.grad).mul_(coef)
    return norm


def local_bytes(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of parameters and optimizer state this rank holds (its shards only)."""
    params = sum(_local(p).numel() * _local(p).element_size() for p in model.parameters())
    state = 0
    if opt is not None:
        for st in opt.state.values():
            state += sum(_local(v).numel() * _local(v).element_size() for v in st.values() if isinstance(v, Tensor))
    return {"param_bytes": params, "optim_bytes": state}
