"""The Switch Transformer's "more experts, same compute" curve in miniature: what `moekit sweep` trained,
summarised (``sweep.json``) and drawn (``report.html``).

A sweep trains the same architecture with 1, 2, 4, ... experts per MoE layer at the same active
parameters per token (1 = the dense twin: one FFN as wide as the active experts), the same data, steps
and seeds. Per expert count it reports the total and active parameters, the final val loss per seed and
its mean ± std, tokens/s, wall time, and the step at which each seed reached the dense run's final val
loss; the *speedup* is dense's steps divided by that step (the Switch paper's "time to quality" at equal
steps). Legend: V evaluations, R runs (seeds) of one expert count.
"""
from __future__ import annotations

import html
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moekit.analysis.stats import RunMetrics, load_metrics

__all__ = ["run_wall_s", "summarize_sweep", "write_sweep_report"]


def run_wall_s(run: RunMetrics) -> float:
    """Seconds of training over every session of a run (``elapsed_s`` restarts at each resume)."""
    total, last = 0.0, 0.0
    for t in run.elapsed_s_S:
        if t < last:
            total += last
        last = float(t)
    return total + last


def _reach_step(run: RunMetrics, target: float) -> int | None:
    return next((int(s) for s, v in zip(run.val_step_V, run.val_loss_V) if v <= target), None)


def summarize_sweep(runs: dict[int, dict[int, Path]], params: dict[int, dict[str, int]], steps: int) -> dict:
    """``runs``: experts -> seed -> run directory (experts 1 is the dense twin); ``params``: experts ->
    {"total_params", "active_params"}. Returns the ``sweep.json`` object."""
    metrics = {e: {s: load_metrics(p) for s, p in by_seed.items()} for e, by_seed in runs.items()}
    dense = metrics.get(1, {})
    rows = []
    for e in sorted(metrics):
        per_seed = []
        for seed, m in sorted(metrics[e].items()):
            target = dense[seed].final_val_loss if seed in dense and dense[seed].final_val_loss is not None else None
            reach = _reach_step(m, target) if target is not None else None
            per_seed.append({"seed": seed, "run_dir": str(m.run_dir), "final_val_loss": m.final_val_loss,
                             "tokens_per_s": m.tokens_per_s, "wall_s": run_wall_s(m),
                             "step_reaching_dense_final": reach,
                             "speedup": steps / reach if reach else None})
        vals = [r["final_val_loss"] for r in per_seed if r["final_val_loss"] is not None]
        speedups = [r["speedup"] for r in per_seed]
        rows.append({
            "experts": e, "total_params": params[e]["total_params"], "active_params": params[e]["active_params"],
            "final_val_loss": {"per_seed": vals, "mean": statistics.fmean(vals) if vals else None,
                               "std": statistics.stdev(vals) if len(vals) > 1 else 0.0},
            "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in per_seed),
            "wall_s": statistics.fmean(r["wall_s"] for r in per_seed),
            # a seed that never reached dense's loss counts as no speedup at all: the mean is None then
            "speedup": statistics.fmean(speedups) if speedups and None not in speedups else None,
            "per_seed": per_seed,
        })
    return {"steps": steps, "seeds": sorted({s for by in runs.values() for s in by}), "runs": rows}


def _curves(runs: dict[int, dict[int, Path]]) -> dict[int, list[RunMetrics]]:
    return {e: [load_metrics(p) for _, p in sorted(by.items())] for e, by in sorted(runs.items())}


def _plot(summary: dict, curves: dict[int, list[RunMetrics]], out: Path) -> tuple[Path, Path]:
    from moekit.analysis.plots import _COLORS, _figure, _save

    fig = _figure(6.5, 4.2)
    ax = fig.subplots()
    rows = [r for r in summary["runs"] if r["final_val_loss"]["mean"] is not None]
    x = [r["total_params"] for r in rows]
    ax.errorbar(x, [r["final_val_loss"]["mean"] for r in rows], yerr=[r["final_val_loss"]["std"] for r in rows],
                marker="o", capsize=4, color=_COLORS[0])
    for r in rows:
        ax.annotate(f"{r['experts']}e", (r["total_params"], r["final_val_loss"]["mean"]), textcoords="offset points",
                    xytext=(4, 6), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("total parameters (log scale); active parameters per token fixed")
    ax.set_ylabel("final val loss (mean ± std over seeds)")
    ax.set_title("more experts at the same compute")
    ax.grid(alpha=0.3, which="both")
    scaling = _save(fig, out / "sweep_loss_vs_params.png")

    fig = _figure(12, 4.2)
    ax_step, ax_time = fig.subplots(1, 2, sharey=True)
    for i, (e, seeds) in enumerate(curves.items()):
        c = _COLORS[i % len(_COLORS)]
        n = min(len(m.val_loss_V) for m in seeds)
        if n == 0:
            continue
        mean_V = np.mean([m.val_loss_V[:n] for m in seeds], axis=0)
        wall_V = np.mean([m.val_elapsed_s_V[:n] for m in seeds], axis=0)
        label = "dense" if e == 1 else f"{e} experts"
        ax_step.plot(seeds[0].val_step_V[:n], mean_V, color=c, marker=".", label=label)
        ax_time.plot(wall_V, mean_V, color=c, marker=".", label=label)
    ax_step.set_xlabel("step")
    ax_time.set_xlabel("wall time (s, one session)")
    ax_step.set_ylabel("val loss (mean over seeds)")
    ax_step.set_title("val loss against steps")
    ax_time.set_title("val loss against wall time")
    finite = [m.val_loss_V for seeds in curves.values() for m in seeds if m.val_loss_V.size]
    if finite:  # the first evaluations would squash the end, where the expert counts separate
        tail = np.concatenate([v[len(v) // 3:] for v in finite])
        lo, hi = float(tail.min()), float(tail.max())
        ax_step.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.3 * (hi - lo + 1e-9))
    for a in (ax_step, ax_time):
        a.grid(alpha=0.3)
    ax_step.legend(fontsize=8)
    return scaling, _save(fig, out / "sweep_loss_curves.png")


def _table(summary: dict) -> str:
    head = ["experts", "total params", "active params", "final val loss (mean ± std)", "per seed", "tokens/s",
            "wall (s)", "step reaching dense's final", "speedup"]
    rows = []
    for r in summary["runs"]:
        v = r["final_val_loss"]
        mean = "n/a" if v["mean"] is None else f"{v['mean']:.4f} ± {v['std']:.4f}"
        reach = ", ".join("never" if s["step_reaching_dense_final"] is None else str(s["step_reaching_dense_final"])
                          for s in r["per_seed"])
        speed = "n/a" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        cells = [("dense" if r["experts"] == 1 else str(r["experts"])), f"{r['total_params']:,}",
                 f"{r['active_params']:,}", mean, ", ".join(f"{x:.4f}" for x in v["per_seed"]),
                 f"{r['tokens_per_s']:,.0f}", f"{r['wall_s']:,.0f}", reach, speed]
        rows.append("<tr>" + "".join(f'<td data-experts="{r["experts"]}" data-col="{i}">{html.escape(c)}</td>'
                                     for i, c in enumerate(cells)) + "</tr>")
    return ("<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def write_sweep_report(summary: dict, runs: dict[int, dict[int, Path]], out: Path, command: Sequence[str]) -> Path:
    """``out/report.html`` with both figures embedded, the table, and the command that reproduces it."""
    from moekit.analysis.report import _CSS, _img
    from moekit.rundir import atomic_write

    scaling, curves = _plot(summary, _curves(runs), out)
    body = ["<h1>moekit sweep</h1>",
            f'<p class="meta">{len(summary["runs"])} expert counts x {len(summary["seeds"])} seed(s), '
            f'{summary["steps"]} steps each; <code>{html.escape(" ".join(command))}</code></p>',
            _table(summary),
            '<p class="note">speedup: the dense run\'s steps divided by the step at which the MoE run first '
            "evaluated at or below the dense run's final val loss (per seed, then the mean; n/a when a seed "
            "never got there).</p>",
            _img(scaling, "val loss against total parameters",
                 "Final val loss against total parameters at a fixed number of active parameters per token "
                 "(Switch Transformer, figure 1 left, in miniature)."),
            _img(curves, "val loss against steps and wall time",
                 "Val loss (mean over seeds) against training steps and wall time for each expert count "
                 "(Switch Transformer, figure 1 right and figure 2).")]
    page = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>moekit sweep</title><style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    return atomic_write(out / "report.html", page)
