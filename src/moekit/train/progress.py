"""Progress display: one live line on a terminal, periodic plain lines otherwise (CI, logs).

The live line is rendered to the console's width by :func:`render_line`: the label, step count, ETA,
loss and val loss always stay; lower-priority fields (tokens/s, then load and drops) are dropped first,
and the bar takes what is left. The ETA is the median step time of a recent window times the steps
left, so a host that stalls for a few steps does not swing it.
"""
from __future__ import annotations

import statistics
import sys
import time
from collections import deque
from typing import Any

__all__ = ["Progress", "format_eta", "render_line"]

_BAR_MIN = 6


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "eta ?"
    s = int(round(seconds))
    if s >= 3600:
        return f"eta {s // 3600}h{s % 3600 // 60:02d}m"
    return f"eta {s // 60}m{s % 60:02d}s" if s >= 60 else f"eta {s}s"


def render_line(label: str, step: int, total: int, eta: str, fields: list[tuple[int, str]], width: int) -> str:
    """One line of at most ``width`` characters. ``fields``: (priority, text), 0 = always shown; higher
    numbers are dropped first when the line would not fit. The bar fills the rest (or goes)."""
    head = f"{label} "
    count = f" {step}/{total} {eta}"
    kept = list(fields)

    def tail() -> str:
        return "".join(f" | {t}" for _, t in kept)

    while len(head) + len(count) + len(tail()) > width - _BAR_MIN and any(p > 0 for p, _ in kept):
        worst = max(p for p, _ in kept)
        drop = max(i for i, (p, _) in enumerate(kept) if p == worst)  # the last of the lowest priority
        del kept[drop]
    room = width - len(head) - len(count) - len(tail())
    if room >= _BAR_MIN:
        filled = round(room * step / max(1, total))
        bar = "━" * filled + "─" * (room - filled)
        return head + bar + count + tail()
    return (head.rstrip() + count + tail())[:width]


class Progress:
    def __init__(self, label: str, total: int, start: int = 0, print_every: int = 50, window: int = 50):
        from rich.console import Console

        self.label, self.total, self.start = label, total, start
        self.console = Console(stderr=True)
        self.print_every = print_every
        self.t_last = time.perf_counter()
        self.step_s: deque[float] = deque(maxlen=window)
        self.live = None
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live("", console=self.console, transient=False, auto_refresh=False)
            self.live.start()

    def fields(self, rec: dict[str, Any], val_loss: float | None, warnings: dict) -> list[tuple[int, str]]:
        """(priority, text) of the line's fields: loss, val loss and collapse warnings always show."""
        imb = rec.get("max_over_mean_load") or {}
        drop = rec.get("drop_rate") or {}
        out = [(0, f"loss {rec['loss']:.3f}")]
        if val_loss is not None:
            out.append((0, f"val {val_loss:.3f}"))
        out.append((1, f"{rec['tokens_per_s']:,.0f} tok/s"))
        if imb:
            out.append((2, f"load max/mean {max(imb.values()):.2f}"))
            out.append((3, f"drop {max(drop.values()):.1%}"))
        if warnings:
            out.append((0, f"COLLAPSE: {len(warnings)} warning(s)"))
        return out

    def _info(self, rec: dict[str, Any], val_loss: float | None, warnings: dict) -> str:
        return " | ".join(t for _, t in self.fields(rec, val_loss, warnings))

    def eta_s(self, step: int) -> float | None:
        """Median of the recent step times (robust to a stalled host) times the steps left."""
        if not self.step_s:
            return None
        return statistics.median(self.step_s) * (self.total - step)

    def update(self, step: int, rec: dict[str, Any], val_loss: float | None, warnings: dict) -> None:
        now = time.perf_counter()
        self.step_s.append(now - self.t_last)
        self.t_last = now
        if self.live is not None:
            from rich.text import Text

            line = render_line(self.label, step, self.total, format_eta(self.eta_s(step)),
                               self.fields(rec, val_loss, warnings), self.console.width)
            text = Text(line)
            text.highlight_words(["COLLAPSE"], "bold red")
            self.live.update(text, refresh=True)
        elif step % self.print_every == 0 or step == self.total or "val_loss" in rec or rec.get("collapse"):
            eta = self.eta_s(step) or 0.0
            print(f"[{self.label}] step {step}/{self.total} eta {eta:.0f}s | {self._info(rec, val_loss, warnings)}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
