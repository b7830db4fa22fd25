"""Gradient accumulation: one optimizer step's batch run as ``grad_accum`` micro-batches.

Every micro-batch has the same number of rows (and tokens), so the mean of the micro-batches' losses is
the loss of the whole batch, and backpropagating ``loss_i / N`` for each accumulates the whole batch's
gradient. The balance loss is the exception, as it is across ranks: it is a product of two batch means,
so it is computed (and its gradient taken) per micro-batch; z-loss and the LM loss are exact.

Routing statistics of the micro-batches are merged into the step's: counts summed, means averaged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moekit.functional.stats import MoEStats

__all__ = ["Accumulated", "forward_backward", "merge_stats", "step_counts"]

# MoEStats fields that count things: summed over micro-batches (every other tensor is a mean: averaged)
_COUNTS = frozenset({"tokens_per_expert", "dropped", "num_assignments", "num_tokens", "extra_tokens_per_expert"})


@dataclass(frozen=True)
class Accumulated:
    """What the step needs of its micro-batches: the batch's LM loss (as the Runtime reports it, averaged
    over ranks), its aux loss and its merged routing statistics (what ``Runtime.reduce`` reads)."""

    loss: float
    aux_loss: float
    stats: dict[int, MoEStats]


def merge_stats(parts: list[dict[int, MoEStats]]) -> dict[int, MoEStats]:
    """One step's statistics from its micro-batches' (layer -> MoEStats each)."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for layer in parts[0]:
        items = [p[layer] for p in parts]
        merged = {}
        for f in dataclasses.fields(MoEStats):
            vals = [getattr(s, f.name) for s in items]
            if vals[0] is None or not isinstance(vals[0], (torch.Tensor, int, float)):
                merged[f.name] = vals[0]  # absent option, or labels (extra_kinds): the same in every part
            elif f.name in _COUNTS:
                merged[f.name] = sum(vals[1:], vals[0])
            else:
                merged[f.name] = sum(vals[1:], vals[0]) / len(vals)
        out[layer] = MoEStats(**merged)
    return out


def step_counts(model: Any, fwd: Any, runtime: Any, x: torch.Tensor, micro: int) -> dict[int, torch.Tensor] | None:
    """``balance_scope="global"``: each such MoE layer's picks per expert over the whole step (every
    micro-batch of this process, summed over the ranks by ``runtime.sum_counts``), from a no-grad forward
    that draws the same router noise as the real one (torch's RNG is put back). None when no layer asks,
    or when the step is one forward on one process: its own counts are the step's already."""
    layers = [b for b in getattr(model, "layers", ()) if b.is_moe and b.ffn.cfg.balance_scope == "global"]
    if not layers or (micro == 1 and getattr(runtime, "world_size", 1) == 1):
        return None
    rng = torch.get_rng_state()
    with torch.no_grad(), model.record_routing() as record:
        for x_i in torch.tensor_split(x, micro):
            fwd(x_i)
    torch.set_rng_state(rng)
    counts = {}
    for b in layers:
        E = b.ffn.cfg.num_experts + b.ffn.cfg.num_extra_experts
        counts[b.idx] = sum(torch.bincount(p.reshape(-1), minlength=E) for p in record[b.idx])
    return runtime.sum_counts(counts)


def forward_backward(fwd: Any, runtime: Any, x: torch.Tensor, y: torch.Tensor, micro: int,
                     bad_loss: Callable[[float, float], Exception], model: Any = None) -> Accumulated:
    """Forward and backward over ``micro`` equal slices of this process's rows ``x``, ``y``.

    ``runtime.loss`` turns each output into the global loss (NaN when anything is not finite);
    ``bad_loss(loss, aux)`` is the error raised before the backward of a non-finite micro-batch.
    Gradients accumulate into ``.grad`` (zero them first). ``model``: the module ``fwd`` runs (it may be
    compiled), for the global balance counts (:func:`step_counts`).
    """
    counts = step_counts(model, fwd, runtime, x, micro)
    losses, auxes, stats = [], [], []
    for x_i, y_i in zip(torch.tensor_split(x, micro), torch.tensor_split(y, micro)):
        with model.global_balance(counts) if counts else contextlib.nullcontext():
            out = fwd(x_i, labels=y_i)
        loss = runtime.loss(out)
        aux = float(out.aux_loss.detach())
        if not math.isfinite(loss):
            raise bad_loss(loss, aux)
        objective = out.loss + out.aux_loss
        # micro == 1 leaves the objective untouched: bit-identical to a step without accumulation
        (objective if micro == 1 else objective / micro).backward()
        losses.append(loss)
        auxes.append(aux)
        stats.append(out.stats)
    return Accumulated(sum(losses) / micro, sum(auxes) / micro, merge_stats(stats))
