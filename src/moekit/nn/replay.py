"""Routing replay (R3, Megatron-Core): record which experts each call chose, then route again with
those choices while the weights come from the current scores (gradients reach the router as usual).

Legend: T rows routed by one call, K top-k.

A record is a plain ``list`` of (T, K) int64 tensors, one per call in call order (a model's record is a
``dict`` of layer index -> such a list), so ``torch.save`` / ``torch.load`` (``weights_only=True``)
keep it as it is. Replay is for the routers that choose a fixed top-k per token.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor

from moekit.config.moe_options import FIXED_K_ROUTERS
from moekit.functional.routing import Routing

__all__ = ["REPLAY_ROUTERS", "RoutingReplay"]

REPLAY_ROUTERS = FIXED_K_ROUTERS  # a record is one (T, K) tensor of picks per call


class RoutingReplay:
    """A layer's recording / replaying state, active only inside ``record`` / ``replay``."""

    def __init__(self, router: str):
        self.router = router
        self.recording: list[Tensor] | None = None
        self.replaying: Iterator[Tensor] | None = None
        self.calls = 0

    def _check(self, what: str) -> None:
        if self.router not in REPLAY_ROUTERS:
            raise ValueError(f"{what} needs a top-k router, one of {REPLAY_ROUTERS}; this layer has "
                             f"router={self.router!r}")
        if self.recording is not None or self.replaying is not None:
            raise RuntimeError(f"{what}: this layer is already recording or replaying its routing")

    @contextmanager
    def record(self) -> Iterator[list[Tensor]]:
        self._check("record_routing")
        self.recording = []
        try:
            yield self.recording
        finally:
            self.recording = None

    @contextmanager
    def replay(self, record: Any) -> Iterator[None]:
        self._check("replay_routing")
        if not isinstance(record, (list, tuple)) or not all(isinstance(t, Tensor) for t in record):
            raise TypeError("replay_routing takes what record_routing recorded: a list of (T, K) tensors")
        self.replaying, self.calls = iter(record), 0
        try:
            yield
        finally:
            self.replaying = None

    def picks(self, num_rows: int, k: int) -> Tensor | None:
        """The recorded (T, K) choices of the next call when replaying, else None."""
        if self.replaying is None:
            return None
        self.calls += 1
        picks = next(self.replaying, None)
        if picks is None:
            raise RuntimeError(f"replay_routing: the record holds {self.calls - 1} call(s); this is call {self.calls}")
        if tuple(picks.shape) != (num_rows, k):
            raise ValueError(f"replay_routing: call {self.calls} routes {num_rows} rows to {k} experts, but the "
                             f"record holds shape {tuple(picks.shape)}")
        return picks

    def keep(self, routing: Routing) -> None:
        if self.recording is not None:
            self.recording.append(routing.indices_TK.detach().clone())
