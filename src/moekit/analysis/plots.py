"""PNG figures of training runs: loss curves, expert-load heatmaps, routing health over time.

Legend: S logged steps, E experts.

Each function takes loaded metrics (``moekit.analysis.stats.RunMetrics``) and writes one PNG. Figures
are drawn on matplotlib's Agg canvas created inside the function: no pyplot, no global backend change,
nothing happens at import.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moekit.analysis.stats import (
    RunMetrics,
    dead_fraction,
    load_shares,
    max_over_mean,
)

__all__ = ["ema", "health_panels", "load_scale", "plot_expert_load", "plot_losses", "plot_routing_health"]

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def _figure(width: float, height: float) -> Any:
    """A Figure attached to its own Agg canvas (the Agg backend, chosen here rather than globally)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    from moekit.rundir import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def ema(x_S: np.ndarray, alpha: float = 0.1) -> np.ndarray:
    """Exponential moving average (bias-corrected, so the first value is not pulled to 0)."""
    out = np.empty(len(x_S))
    acc, norm = 0.0, 0.0
    for i, v in enumerate(np.asarray(x_S, dtype=np.float64)):
        acc = (1 - alpha) * acc + alpha * v
        norm = (1 - alpha) * norm + alpha
        out[i] = acc / norm
    return out


def plot_losses(runs: Sequence[RunMetrics], labels: Sequence[str], path: Path) -> Path:
    """Train (smoothed, raw faint) and validation loss of every run, against steps and against wall time."""
    fig = _figure(12, 4.2)
    ax_step, ax_time = fig.subplots(1, 2, sharey=True)
    for i, (run, label) in enumerate(zip(runs, labels)):
        c = _COLORS[i % len(_COLORS)]
        for ax, x_S, xv_V in ((ax_step, run.step_S, run.val_step_V), (ax_time, run.elapsed_s_S, run.val_elapsed_s_V)):
            ax.plot(x_S, run.loss_S, color=c, alpha=0.2, linewidth=0.8)
            ax.plot(x_S, ema(run.loss_S), color=c, linewidth=1.5, label=f"{label} train (EMA)")
            if run.val_loss_V.size:
                ax.plot(xv_V, run.val_loss_V, color=c, linestyle="--", marker="o", markersize=4,
                        label=f"{label} val")
    ax_step.set_xlabel("step")
    ax_time.set_xlabel("wall time (s)")
    ax_step.set_ylabel("loss (nats/token)")
    ax_step.set_title("loss against steps")
    ax_time.set_title("loss against wall time")
    finite = np.concatenate([r.loss_S[np.isfinite(r.loss_S)] for r in runs] + [np.zeros(0)])
    if finite.size:  # the first steps' loss (~ln V) would squash the interesting part of the curves
        lo, hi = float(finite.min()), float(np.percentile(finite, 98))
        ax_step.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    for ax in (ax_step, ax_time):
        ax.grid(alpha=0.3)
    ax_step.legend(fontsize=8)
    return _save(fig, path)


def load_scale(run: RunMetrics) -> float:
    """The heatmaps' colour maximum: the 99th percentile of the expert shares over the second half of
    training. Early spikes (one expert taking most tokens for a few steps) would otherwise set the scale
    and wash out the imbalance that lasts."""
    steady = [load_shares(r.counts_SE)[len(r.counts_SE) // 2:] for r in run.layers.values()]
    steady = [s.ravel() for s in steady if s.size]
    if not steady:
        return 1.0
    return float(min(max(np.percentile(np.concatenate(steady), 99), 1e-9), 1.0))


def plot_expert_load(run: RunMetrics, label: str, path: Path) -> Path:
    """One heatmap per MoE layer: each expert's share of the layer's assignments at each logged step."""
    layers = list(run.layers)
    fig = _figure(12, 0.6 + 2.1 * max(1, len(layers)))
    axes = np.atleast_1d(fig.subplots(max(1, len(layers)), 1, sharex=True, squeeze=False)[:, 0])
    observed = max([float(load_shares(r.counts_SE).max()) for r in run.layers.values()] + [1e-9])
    vmax = load_scale(run)
    im = None
    for ax, layer in zip(axes, layers):
        r = run.layers[layer]
        share_ES = load_shares(r.counts_SE).T
        steps = run.step_S
        extent = (steps[0] - 0.5, steps[-1] + 0.5, r.num_experts - 0.5, -0.5) if steps.size else None
        im = ax.imshow(share_ES, aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=vmax,
                       extent=extent)
        ax.set_ylabel(f"layer {layer}\nexpert")
        ax.set_yticks(range(r.num_experts))
        ax.tick_params(axis="y", labelsize=7)
        for ev in run.collapse_events:
            if ev.get("layer") == layer:
                ax.axvline(ev["step"], color="cyan", linewidth=0.8, linestyle=":")
    if layers:
        uniform = 1 / run.layers[layers[0]].num_experts
        axes[0].set_title(f"{label}: each expert's share of its layer's assignments "
                          f"(uniform = {uniform:.1%}; dotted line = collapse warning)")
    else:
        axes[0].set_title(f"{label}: no MoE layers")
    axes[-1].set_xlabel("step")
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.9, label="share of assignments",
                     extend="max" if observed > vmax else "neither")
    return _save(fig, path)


def _varying(x_S: np.ndarray | None) -> np.ndarray:
    """``x_S`` when it changes over the run, else zeros: a constant top-k count needs no panel."""
    if x_S is None or not np.isfinite(x_S).any() or np.nanmax(x_S) == np.nanmin(x_S):
        return np.zeros(0)
    return x_S


def health_panels(run: RunMetrics, panels: list) -> tuple[list, list[str]]:
    """(the panels with something to show, the names of those that are 0 at every step or never logged):
    no drops when dropless, no dead experts, a constant experts-per-token. An empty axis says nothing the
    figure's title cannot."""
    def shown(fn) -> bool:
        return any(np.nan_to_num(fn(r)).any() for r in run.layers.values())

    constant = [t.split(" (")[0] for t, fn in panels if not shown(fn)]
    return [(t, fn) for t, fn in panels if shown(fn)] or panels[:1], constant


def _absent_note(names: list[str]) -> str:
    """'(drop rate: 0 at every step; experts per token: the same at every step)' for the title."""
    varying = {"experts per token"}  # hidden when constant, not when zero
    zero = [n for n in names if n not in varying]
    same = [n for n in names if n in varying]
    parts = ([f"{', '.join(zero)}: 0 at every step"] if zero else []) + \
        ([f"{', '.join(same)}: the same at every step"] if same else [])
    return f" ({'; '.join(parts)})" if parts else ""


def plot_routing_health(run: RunMetrics, label: str, path: Path) -> Path:
    """Per layer over steps: max/mean load, dead-expert fraction, router entropy, drop rate, experts per
    token, balance loss and z-loss (the latter two as computed, before their coefficients). A quantity
    that is 0 at every step in every layer gets no panel; the title lists it."""
    tcfg = run.train_config
    threshold, window = tcfg.get("dead_threshold", 0.02), tcfg.get("collapse_window", 50)
    panels = [
        ("max / mean expert load", lambda r: max_over_mean(r.counts_SE)),
        (f"dead experts (share < {threshold:.0%} for {window} steps)",
         lambda r: dead_fraction(r.counts_SE, threshold, window)),
        ("router entropy (nats)", lambda r: r.router_entropy_S),
        ("drop rate (capacity)", lambda r: r.drop_rate_S),
        ("experts per token", lambda r: _varying(r.experts_per_token_S)),
        ("balance loss", lambda r: r.balance_loss_S),
        ("router z-loss", lambda r: r.z_loss_S),
    ]
    panels, constant = health_panels(run, panels)
    cols = 2 if len(panels) == 4 else min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = _figure(12, 0.6 + 2.9 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, squeeze=False).reshape(-1))
    for ax, (title, fn) in zip(axes, panels):
        for i, (layer, r) in enumerate(run.layers.items()):
            ax.plot(run.step_S, fn(r), color=_COLORS[i % len(_COLORS)], linewidth=1.1, label=f"layer {layer}")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if title.startswith("max / mean"):
            ax.axhline(1.0, color="gray", linewidth=0.8, linestyle=":")
            ax.legend(fontsize=8)
        if title.startswith("router entropy") and run.layers:
            E = next(iter(run.layers.values())).num_experts
            ax.axhline(np.log(E), color="gray", linewidth=0.8, linestyle=":")
            ax.text(0.99, 0.02, f"dotted: ln E = {np.log(E):.2f}", transform=ax.transAxes, ha="right",
                    fontsize=8, color="gray")
        if title.startswith("dead experts"):
            ax.set_ylim(-0.05, 1.05)
    for ax in axes[len(panels):]:
        ax.remove()
    for ax in axes[max(0, len(panels) - cols):len(panels)]:
        ax.set_xlabel("step")
    fig.suptitle(f"{label}: routing health{_absent_note(constant)}")
    return _save(fig, path)
