"""MoE against its dense twin across seeds: the late-training val loss zoomed in, the MoE − dense
difference with its seed spread, and the table of means. A 0.006-nat gap is invisible on a 3-7 nat
loss axis; these make it readable.

Legend: V evaluations, P paired seeds.
"""
from __future__ import annotations

import html
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moekit.analysis.stats import RunMetrics

__all__ = ["paired_seeds", "plot_moe_vs_dense", "seeds_table"]


def _seed(run: RunMetrics) -> int | None:
    return run.train_config.get("seed")


def paired_seeds(runs: Sequence[RunMetrics]) -> list[tuple[int, RunMetrics, RunMetrics]]:
    """(seed, MoE run, dense run) for every seed that has one of each, in seed order."""
    moe = {_seed(r): r for r in runs if r.is_moe and r.val_loss_V.size}
    dense = {_seed(r): r for r in runs if not r.is_moe and r.val_loss_V.size}
    return [(s, moe[s], dense[s]) for s in sorted(set(moe) & set(dense), key=lambda s: (s is None, s))]


def _difference_V(m: RunMetrics, d: RunMetrics) -> tuple[np.ndarray, np.ndarray]:
    """MoE − dense val loss at the steps both evaluated."""
    common_V, im, idx = np.intersect1d(m.val_step_V, d.val_step_V, return_indices=True)
    return common_V, m.val_loss_V[im] - d.val_loss_V[idx]


def plot_moe_vs_dense(runs: Sequence[RunMetrics], path: Path) -> Path | None:
    """Left: val loss over the second half of training, zoomed to its range (mean of the seeds, band =
    min..max). Right: MoE − dense val loss per seed (thin), their mean (bold) and spread (band); below 0
    is MoE ahead. None when no seed has both an MoE and a dense run."""
    from moekit.analysis.plots import _figure, _save

    pairs = paired_seeds(runs)
    if not pairs:
        return None
    fig = _figure(12, 4.0)
    ax_late, ax_diff = fig.subplots(1, 2)
    for side, color, pick in (("MoE", "#1f77b4", 1), ("dense", "#d62728", 2)):
        side_runs = [p[pick] for p in pairs]
        steps_V = side_runs[0].val_step_V
        late = steps_V >= steps_V[-1] / 2
        curves_PV = np.array([r.val_loss_V[: len(steps_V)] for r in side_runs if len(r.val_loss_V) >= len(steps_V)])
        mean_V = curves_PV.mean(axis=0)
        ax_late.plot(steps_V[late], mean_V[late], color=color, marker="o", markersize=3,
                     label=f"{side} val ({len(curves_PV)} seed{'s' if len(curves_PV) > 1 else ''})")
        if len(curves_PV) > 1:
            ax_late.fill_between(steps_V[late], curves_PV.min(0)[late], curves_PV.max(0)[late], color=color,
                                 alpha=0.15)
    ax_late.set_title("val loss, second half of training (zoomed)")
    ax_late.set_xlabel("step")
    ax_late.set_ylabel("val loss (nats/token)")
    ax_late.legend(fontsize=8)
    diffs = [_difference_V(m, d) for _, m, d in pairs]
    n = min(len(v) for v, _ in diffs)
    steps_V = diffs[0][0][:n]
    diff_PV = np.array([dv[:n] for _, dv in diffs])
    for (seed, _, _), row_V in zip(pairs, diff_PV):
        ax_diff.plot(steps_V, row_V, color="#555", linewidth=0.8, alpha=0.6, label=f"seed {seed}")
    ax_diff.plot(steps_V, diff_PV.mean(0), color="#1f77b4", linewidth=2.0, label="mean")
    if len(diff_PV) > 1:
        ax_diff.fill_between(steps_V, diff_PV.min(0), diff_PV.max(0), color="#1f77b4", alpha=0.15,
                             label="seed spread (min..max)")
    ax_diff.axhline(0.0, color="black", linewidth=0.8)
    tail = diff_PV[:, steps_V >= steps_V[-1] / 4]
    if tail.size:  # the first evaluations' differences would dwarf the end's
        lo, hi = float(min(tail.min(), 0.0)), float(max(tail.max(), 0.0))
        pad = 0.1 * (hi - lo + 1e-6)
        ax_diff.set_ylim(lo - pad, hi + pad)
    ax_diff.set_title("MoE − dense val loss (below 0: MoE ahead)")
    ax_diff.set_xlabel("step")
    ax_diff.legend(fontsize=8)
    for ax in (ax_late, ax_diff):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _val_by_time(run: RunMetrics) -> tuple[np.ndarray, np.ndarray]:
    """(training seconds, val loss) of each evaluation, resumed sessions laid end to end."""
    t_S = run.elapsed_s_S.astype(np.float64)
    restart_S = np.concatenate([[False], t_S[1:] < t_S[:-1]])
    offset_S = np.cumsum(np.where(restart_S, np.concatenate([[0.0], t_S[:-1]]), 0.0))
    total_S = t_S + offset_S
    at_V = np.searchsorted(run.step_S, run.val_step_V)
    return total_S[np.minimum(at_V, len(total_S) - 1)], run.val_loss_V


def equal_time_diffs(pairs) -> list[tuple[float, float]]:
    """(seconds, MoE − dense val loss) per seed at the shorter run's training time (linear interpolation
    between evaluations), the same rule as the trainer's summary (moekit.train.compare)."""
    out = []
    for _, m, d in pairs:
        (tm, vm), (td, vd) = _val_by_time(m), _val_by_time(d)
        t = float(min(tm[-1], td[-1]))
        if t < tm[0] or t < td[0]:
            continue
        out.append((t, float(np.interp(t, tm, vm) - np.interp(t, td, vd))))
    return out


def _mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.fmean(xs):.4f} &plusmn; {statistics.stdev(xs):.4f}"


def seeds_table(runs: Sequence[RunMetrics]) -> str:
    """Final val loss of each side over the paired seeds (mean ± std, min, max) and the difference."""
    pairs = paired_seeds(runs)
    if not pairs:
        return ""
    rows = []
    for side, pick in (("MoE", 1), ("dense", 2)):
        vals = [p[pick].final_val_loss for p in pairs]
        rows.append(f'<tr><td class="l">{side}</td><td>{len(vals)}</td>'
                    f'<td data-run="seeds" data-metric="{side.lower()}_mean_val">{_mean_std(vals)}</td>'
                    f"<td>{min(vals):.4f}</td><td>{max(vals):.4f}</td></tr>")
    diffs = [m.final_val_loss - d.final_val_loss for _, m, d in pairs]
    wins = sum(x < 0 for x in diffs)
    rows.append(f'<tr><td class="l">MoE &minus; dense</td><td>{len(diffs)}</td>'
                f'<td data-run="seeds" data-metric="diff_mean_val">{_mean_std(diffs)}</td>'
                f"<td>{min(diffs):+.4f}</td><td>{max(diffs):+.4f}</td></tr>")
    timed = equal_time_diffs(pairs)
    if len(timed) == len(pairs):
        per = [d for _, d in timed]
        rows.append(f'<tr><td class="l">MoE &minus; dense at equal wall time</td><td>{len(per)}</td>'
                    f'<td data-run="seeds" data-metric="diff_equal_time">{_mean_std(per)}</td>'
                    f"<td>{min(per):+.4f}</td><td>{max(per):+.4f}</td></tr>")
    seeds = ", ".join(html.escape(str(s)) for s, _, _ in pairs)
    when = (f" Equal wall time: each seed's val losses compared at the shorter run's training time "
            f"({statistics.fmean(t for t, _ in timed):,.0f} s on average), interpolated between evaluations."
            if timed else "")
    return ('<table><thead><tr><th class="l">final val loss</th><th>seeds</th><th>mean &plusmn; std</th>'
            "<th>min</th><th>max</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
            f'<p class="note">Seeds {seeds}; MoE lower in {wins} of {len(diffs)} at equal steps.{when}</p>')
