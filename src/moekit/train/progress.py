"""Progress display: a rich live bar on a terminal, periodic plain lines otherwise (CI, logs)."""
from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["Progress"]


class Progress:
    def __init__(self, label: str, total: int, start: int = 0, print_every: int = 50):
        from rich.console import Console

        self.label, self.total, self.start = label, total, start
        self.console = Console(stderr=True)
        self.print_every = print_every
        self.t0 = time.perf_counter()
        self.bar = None
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                    console=self.console, transient=False)
            self.task = self.bar.add_task(label, total=total, completed=start, info="")
            self.bar.start()

    def _info(self, rec: dict[str, Any], val_loss: float | None, warnings: dict) -> str:
        imb = rec.get("max_over_mean_load") or {}
        drop = rec.get("drop_rate") or {}
        parts = [f"loss {rec['loss']:.3f}"]
        if val_loss is not None:
            parts.append(f"val {val_loss:.3f}")
        parts.append(f"{rec['tokens_per_s']:,.0f} tok/s")
        if imb:
            parts.append(f"load max/mean {max(imb.values()):.2f}")
            parts.append(f"drop {max(drop.values()):.1%}")
        if warnings:
            parts.append(f"[red]COLLAPSE: {len(warnings)} warning(s)[/red]" if self.bar else
                         f"COLLAPSE: {len(warnings)} warning(s)")
        return " | ".join(parts)

    def update(self, step: int, rec: dict[str, Any], val_loss: float | None, warnings: dict) -> None:
        info = self._info(rec, val_loss, warnings)
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif step % self.print_every == 0 or step == self.total or "val_loss" in rec or rec.get("collapse"):
            done = step - self.start
            eta = (time.perf_counter() - self.t0) / max(1, done) * (self.total - step)
            print(f"[{self.label}] step {step}/{self.total} eta {eta:.0f}s | {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
