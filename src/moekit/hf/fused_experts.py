"""Experts stored as two fused tensors per layer, the gate rows first: ``gate_up`` (E, 2H, D) and ``down``
(E, D, H), nn.Linear's (out, in) layout per expert (GraniteMoE's ``input_linear`` / ``output_linear``).

Legend: E experts, H expert hidden, D model dim.

Read one expert at a time (a gate or up half, or the down matrix), written back fused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moekit.hf.adapter import Entry, ExpertRows, FusedIO

__all__ = ["fused_expert_io"]

_WHICH = ("w_gate", "w_up", "w_down")


def fused_expert_io(gate_up: str, down: str) -> FusedIO:
    """The FusedIO of experts at ``model.layers.{i}.{gate_up}`` and ``model.layers.{i}.{down}``."""

    def source(plan: Any, layer: str, suffix: str, shape: tuple[int, ...]) -> tuple[str, Any]:
        which, reader = suffix.rsplit(".", 1)[1], plan.reader
        E, R, C = shape
        if which == "w_down":
            plan.need(layer + down, shape)

            def fill_down(dst: Tensor) -> None:
                for e in range(E):
                    dst[e].copy_(reader.get(layer + down, index=e))

            return ("fn", fill_down)
        plan.need(layer + gate_up, (E, 2 * R, C))
        rows = slice(0, R) if which == "w_gate" else slice(R, 2 * R)

        def fill_half(dst: Tensor) -> None:
            for e in range(E):
                dst[e].copy_(reader.get(layer + gate_up, index=e)[rows])

        return ("fn", fill_half)

    def entries(layer: str, t: dict[str, Tensor], hf: dict[str, Any]) -> list[Entry]:
        g, u, d = (t[f"ffn.experts.{n}"] for n in _WHICH)
        E, H, D = g.shape
        return [
            (layer + gate_up, (E, 2 * H, D), g.dtype, lambda: torch.cat([g, u], dim=1)),
            (layer + down, (E, D, H), d.dtype, lambda: d),
        ]

    return FusedIO(tuple(f"ffn.experts.{n}" for n in _WHICH), source, entries, ExpertRows(down, gate_up=gate_up))
