"""The trainer's routing monitor: collapse detection over the per-step expert loads it logs.

An expert is *dead* when its share of its layer's assignments stays below ``dead_threshold`` for
``window`` consecutive steps; a layer is *hot* when one expert takes more than ``hot_threshold`` of
the assignments for ``window`` consecutive steps. Each condition is reported once when it starts
holding for a full window, and stays in ``active`` until it clears.

``replay_collapse`` runs the same detector offline over a logged run (e.g. with other thresholds).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["CollapseDetector", "replay_collapse"]


class CollapseDetector:
    def __init__(self, dead_threshold: float = 0.02, hot_threshold: float = 0.6, window: int = 50,
                 start_after: int = 0):
        if not 0 <= dead_threshold < 1 or not 0 < hot_threshold <= 1:
            raise ValueError(f"dead_threshold={dead_threshold} must be in [0,1) and hot_threshold="
                             f"{hot_threshold} in (0,1]")
        if window < 1:
            raise ValueError(f"window={window} must be >= 1")
        self.dead_threshold, self.hot_threshold, self.window = dead_threshold, hot_threshold, window
        # steps <= start_after (the trainer passes its warmup) are ignored: routing is still settling
        self.start_after = start_after
        self._run: dict[tuple[str, str, int], int] = {}  # (layer, kind, expert) -> consecutive steps
        self.active: dict[tuple[str, str, int], dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []

    def update(self, step: int, tokens_per_expert: dict[str, list[int]]) -> list[dict[str, Any]]:
        """Feed one step's loads ({layer: counts per expert}); return the events that fire now."""
        if step <= self.start_after:
            return []
        fired = []
        seen = set()
        for layer, counts in tokens_per_expert.items():
            total = sum(counts)
            if total <= 0:
                continue
            for e, c in enumerate(counts):
                share = c / total
                for kind, cond in (("dead", share < self.dead_threshold), ("hot", share > self.hot_threshold)):
                    key = (str(layer), kind, e)
                    if not cond:
                        continue
                    seen.add(key)
                    self._run[key] = self._run.get(key, 0) + 1
                    if self._run[key] == self.window:
                        what = (f"expert {e} of layer {layer} got {share:.1%} of assignments (< {self.dead_threshold:.0%})"
                                if kind == "dead" else
                                f"expert {e} of layer {layer} took {share:.1%} of assignments (> {self.hot_threshold:.0%})")
                        ev = {"step": step, "layer": str(layer), "kind": kind, "expert": e, "share": share,
                              "since_step": step - self.window + 1,
                              "message": f"{what} for {self.window} steps"}
                        self.active[key] = ev
                        fired.append(ev)
        for key in list(self._run):
            if key not in seen:
                del self._run[key]
                self.active.pop(key, None)
        self.events.extend(fired)
        return fired


def replay_collapse(step_S: Sequence[int], counts_by_layer: Mapping[str, Any], dead_threshold: float = 0.02,
                    hot_threshold: float = 0.6, window: int = 50, start_after: int = 0) -> list[dict[str, Any]]:
    """Feed logged loads ({layer: counts (S, E)}, rows aligned with step_S) through a fresh detector.

    Gives the events the trainer would have logged with these thresholds (when every step was logged).
    """
    det = CollapseDetector(dead_threshold, hot_threshold, window, start_after)
    rows = {layer: [list(map(int, row)) for row in counts] for layer, counts in counts_by_layer.items()}
    for i, step in enumerate(step_S):
        det.update(int(step), {layer: r[i] for layer, r in rows.items()})
    return det.events
