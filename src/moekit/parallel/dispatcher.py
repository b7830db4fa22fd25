"""The expert-parallel token dispatcher and the functions that shard experts over a process group.

Legend: n tokens of this rank, D model dim, E experts, W ranks in the EP group, L = E / W experts per
rank, A this rank's assignments (sorted by global expert), R rows received for the local experts.

Rank r of the EP group holds global experts ``[r*L, (r+1)*L)``, local expert i being global expert
r*L + i, stored exactly like the single-process layer (``experts.w_up`` etc. with leading dim L).
Routing (and the capacity drops, which filter assignments before dispatch) stays on the token's
rank; only the chosen (token, expert) rows travel:

1. permute: gather each assignment's token, in global expert order = destination-rank order;
2. exchange per-expert counts (W x L integers), so every rank knows the sizes it will receive;
3. all-to-all the rows (variable splits) to the ranks of their experts;
4. run the local experts over the received rows (regrouped expert-major, one run per expert);
5. all-to-all the outputs back to the ranks the rows came from (the reverse splits);
6. combine: weight each output by its routing weight and add it into its token's row.

Backward runs 5, 4, 3 reversed (gradients of rows go home), so an expert's gradient is the plain sum
over every token routed to it from any rank, and the router's gradient covers this rank's tokens.
Nothing is rescaled here; averaging over data-parallel replicas is the trainer's job (see grads.py).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.functional.dispatch import sort_by_expert
from moekit.nn.experts import GroupedExperts
from moekit.nn.moe import MoELayer, expert_parallel_layers
from moekit.parallel.all_to_all import CommMeter, all_to_all, exchange_counts
from moekit.parallel.groups import check_same_config

__all__ = ["AllToAllDispatcher", "apply_expert_parallel", "expert_parallel_meter", "shard_moe_layer"]


class AllToAllDispatcher:
    """Sends every expert's run of assignments to the rank that holds the expert, and the outputs back.

    The :class:`moekit.nn.dispatch.Dispatcher` call: ``dispatcher(x_nD, token_A, expert_A, weight_A,
    experts) -> (y_nD, counts_E)`` with global expert ids (E marks a dropped assignment) and ``experts``
    the L local experts; ``counts_E`` are this rank's assignments per global expert. Traffic is added
    to ``meter`` (bytes and seconds, fwd + bwd).
    """

    expert_parallel = True

    def __init__(self, group: Any, num_experts: int, meter: CommMeter | None = None):
        W = dist.get_world_size(group)
        if num_experts % W:
            raise ValueError(f"num_experts={num_experts} must be divisible by the expert-parallel world size {W}")
        self.group = group
        self.world_size = W
        self.rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.num_local = num_experts // W
        self.first_expert = self.rank * self.num_local
        self.meter = meter if meter is not None else CommMeter()

    def __deepcopy__(self, memo: dict) -> AllToAllDispatcher:
        # a copied layer (e.g. an EMA model) talks over the same process group and meter
        return self

    def __repr__(self) -> str:
        return f"AllToAllDispatcher(rank={self.rank}, world_size={self.world_size}, experts={self.first_expert}.." \
               f"{self.first_expert + self.num_local - 1})"

    def __call__(self, x_nD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor,
                 experts: GroupedExperts) -> tuple[Tensor, Tensor]:
        W, L = self.world_size, self.num_local
        if experts.num_experts != L:
            raise ValueError(f"rank {self.rank} holds {experts.num_experts} experts, expected E/W = {L}")
        # 1. permute: one row per kept assignment, runs in global expert order = destination-rank order
        d = sort_by_expert(token_A, expert_A, weight_A, self.num_experts)
        xs_AD = x_nD.index_select(0, d.token_A)
        # 2. counts: send_WL[j, e] rows for expert e of rank j; recv_WL[i, e] rows from rank i for my e
        send_WL = d.counts_E.view(W, L)
        recv_WL = exchange_counts(send_WL, self.group, self.meter)
        send_splits = send_WL.sum(1).tolist()
        recv_splits = recv_WL.sum(1).tolist()
        # 3. rows to the experts' ranks; they arrive source-major (for src: for expert: rows)
        xr_RD = all_to_all(xs_AD, recv_splits, send_splits, self.group, self.meter)
        # 4. local experts, each row its own "token" with weight 1: outputs stay in arrival order, ready
        #    to go back (the experts' stable sort regroups the rows expert-major for the GEMMs)
        R = xr_RD.shape[0]
        local_R = torch.arange(L, device=x_nD.device).repeat(W).repeat_interleave(recv_WL.reshape(-1), output_size=R)
        rows_R = torch.arange(R, device=x_nD.device)
        yr_RD = experts(xr_RD, rows_R, local_R, torch.ones(R, dtype=x_nD.dtype, device=x_nD.device))
        # 5. outputs home
        ys_AD = all_to_all(yr_RD, send_splits, recv_splits, self.group, self.meter)
        # 6. weighted combine, in the same order as the single-process op
        y_nD = torch.zeros_like(x_nD).index_add(0, d.token_A, ys_AD * d.weight_A.to(ys_AD.dtype).unsqueeze(1))
        return y_nD, d.counts_E


def _slice_experts_(experts: GroupedExperts, first: int, count: int) -> None:
    """Keep experts [first, first + count) in place (no new random draws: a seeded model stays a slice)."""
    for name in ("w_gate", "w_up", "w_down", "gate_bias", "up_bias", "down_bias"):  # biases: BiasedExperts
        p = getattr(experts, name, None)
        if p is not None:
            setattr(experts, name, nn.Parameter(p.detach()[first:first + count].clone(), requires_grad=p.requires_grad))


def shard_moe_layer(layer: MoELayer, group: Any, meter: CommMeter | None = None) -> MoELayer:
    """Make ``layer`` expert-parallel over ``group``: keep this rank's experts, swap in the all-to-all
    dispatcher; return the layer.

    Collective (all ranks of ``group``): checks that every rank has the same MoEConfig.
    """
    if layer.expert_parallel:
        raise ValueError("this MoELayer is already expert-parallel")
    cfg = layer.cfg
    W = dist.get_world_size(group)
    if cfg.num_experts % W:
        raise ValueError(f"num_experts={cfg.num_experts} must be divisible by the expert-parallel world size {W}")
    check_same_config(cfg.to_dict(), "MoEConfig", group)
    disp = AllToAllDispatcher(group, cfg.num_experts, meter)
    _slice_experts_(layer.experts, disp.first_expert, disp.num_local)
    layer.dispatcher = disp
    return layer


def apply_expert_parallel(model: nn.Module, group: Any, meter: CommMeter | None = None) -> CommMeter:
    """Shard the experts of every MoELayer in ``model`` over ``group``; return the shared traffic meter.

    Build the full model with the same seed on every rank first: each rank then keeps its slice of
    identical experts, and non-expert weights are identical everywhere.
    """
    meter = meter if meter is not None else CommMeter()
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        shard_moe_layer(layer, group, meter)
    return meter


def expert_parallel_meter(model: nn.Module) -> CommMeter | None:
    """The meter of the first expert-parallel layer of ``model`` (shared by all with apply_expert_parallel)."""
    layers = expert_parallel_layers(model)
    return layers[0].dispatcher.meter if layers else None
