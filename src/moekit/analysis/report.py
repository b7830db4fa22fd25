"""One self-contained HTML report of one or more runs (e.g. MoE vs dense after ``moekit train --compare``).

``write_report(run_dirs, out_dir)`` writes ``out_dir/report.html`` with every figure embedded as a
base64 PNG data URI (the file can be mailed on its own), and the same PNGs beside it.
Contents: a table of the runs (losses, tokens/s, total/active parameters), loss against steps and
wall time, and per MoE run: a routing-health table, the expert-load heatmaps, routing health over
time, collapse warnings and the specialization tables.
"""
from __future__ import annotations

import base64
import datetime
import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moekit.analysis.compare_plots import plot_moe_vs_dense, seeds_table
from moekit.analysis.plots import plot_expert_load, plot_losses, plot_routing_health
from moekit.analysis.specialization import Specialization, inspect_run, show_token
from moekit.analysis.stats import RunMetrics, layer_summary, load_metrics
from moekit.rundir import atomic_write

__all__ = ["model_params", "run_labels", "write_report"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1240px;
       color: #222; line-height: 1.4; padding: 0 16px; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta, .note { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; margin: 10px 0 18px; font-size: 0.88em; display: block; max-width: 100%;
        overflow-x: auto; }  /* a wide table scrolls by itself on a phone; the page does not */
td { white-space: nowrap; } td.tokens, td.l { white-space: normal; }
@media (max-width: 640px) { body { margin: 8px auto; padding: 0 8px; } h2 { margin-top: 24px; } }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
figure { margin: 12px 0 24px; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.88em; }
code { background: #f3f3f3; padding: 0 3px; border-radius: 3px; white-space: pre-wrap; overflow-wrap: anywhere;
       font-size: 1.05em; }
.warn { color: #b00; font-weight: 600; } .ok { color: #080; }
td.tokens { text-align: left; max-width: 560px; }
"""


def model_params(model_config: dict[str, Any]) -> dict[str, int] | None:
    """Total and active parameters per token of a config.json, counted by ``MoETransformer.num_params``
    (the trainer's figures); None when the config cannot be read.

    A small model is built on the CPU (milliseconds); a large one on the meta device, which allocates
    nothing but costs about a second the first time (torch loads its meta kernels then).
    """
    if not model_config:
        return None
    import torch

    from moekit.config import ModelConfig
    from moekit.nn.transformer import MoETransformer

    try:
        cfg = ModelConfig.from_dict(model_config)
    except (TypeError, ValueError):
        return None
    m = cfg.moe
    rough = cfg.vocab_size * cfg.d_model + cfg.n_layers * (4 * cfg.d_model ** 2 + 3 * cfg.d_model * max(
        m.num_experts * m.d_hidden + m.shared_hidden_total, cfg.dense_hidden))
    with torch.device("meta" if rough > 20_000_000 else "cpu"):
        return MoETransformer(cfg).num_params()


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Short unique names: the directory name, with parents added until the names differ."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(d) for d in run_dirs]


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def _img(path: Path, alt: str, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><a href="{html.escape(path.name)}"><img src="data:image/png;base64,{data}" '
            f'alt="{html.escape(alt)}"></a><figcaption>{caption}</figcaption></figure>')


def _fmt(v: float | None, spec: str, none: str = "n/a") -> str:
    return none if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def _cell(run: str, metric: str, text: str, cls: str = "") -> str:
    """A table cell tagged with the run and metric it shows (tests read the numbers back by these)."""
    c = f' class="{cls}"' if cls else ""
    return f'<td{c} data-run="{html.escape(run)}" data-metric="{metric}">{html.escape(text)}</td>'


def _runs_table(runs: Sequence[RunMetrics], labels: Sequence[str], params: Sequence[dict | None]) -> str:
    head = ["run", "type", "steps", "final train loss", "final val loss", "best val loss", "tokens/s",
            "wall time (s)", "total params", "active params / token", "collapse warnings"]
    rows = []
    for run, label, p in zip(runs, labels, params):
        best = float(run.val_loss_V.min()) if run.val_loss_V.size else None
        n_warn = len(run.collapse_events)
        kind = "MoE" if run.is_moe else "dense"
        if run.is_moe:
            m = run.model_config.get("moe", {})
            kind += f" ({m.get('num_experts', '?')} experts, top-{m.get('top_k', '?')}, {m.get('router', '?')})"
        rows.append("<tr>" + "".join([
            f'<td class="l">{html.escape(label)}</td>', f'<td class="l">{html.escape(kind)}</td>',
            _cell(label, "steps", str(int(run.step_S[-1])) if run.step_S.size else "0"),
            _cell(label, "final_loss", _fmt(run.final_loss, ".4f")),
            _cell(label, "final_val_loss", _fmt(run.final_val_loss, ".4f")),
            _cell(label, "best_val_loss", _fmt(best, ".4f")),
            _cell(label, "tokens_per_s", _fmt(run.tokens_per_s, ",.0f")),
            _cell(label, "wall_s", _fmt(run.wall_s, ",.1f")),
            _cell(label, "total_params", _fmt(p and p["total_params"], ",d")),
            _cell(label, "active_params", _fmt(p and p["active_params"], ",d")),
            _cell(label, "collapse_warnings", str(n_warn), "warn" if n_warn else "ok"),
        ]) + "</tr>")
    table = ("<table><thead><tr>" + "".join(f'<th{" class=l" if h in ("run", "type") else ""}>{h}</th>'
                                            for h in head) + "</tr></thead><tbody>"
             + "".join(rows) + "</tbody></table>")
    notes = [('<p class="note">tokens/s: median over logged steps after the first tenth (as the trainer '
              "reports it); wall time: elapsed seconds at the last logged step.</p>")]
    moe = [i for i, r in enumerate(runs) if r.is_moe]
    dense = [i for i, r in enumerate(runs) if not r.is_moe]
    if len(moe) == 1 and len(dense) == 1:
        m, d = runs[moe[0]], runs[dense[0]]
        if m.final_val_loss is not None and d.final_val_loss is not None:
            diff = m.final_val_loss - d.final_val_loss
            reach = next((int(s) for s, v in zip(m.val_step_V, m.val_loss_V) if v <= d.final_val_loss), None)
            when = f"reached dense's final val loss at step {reach}" if reach is not None else \
                "never reached dense's final val loss"
            notes.append(f"<p>MoE &minus; dense final val loss: <b>{diff:+.4f}</b> "
                         f"({'MoE lower' if diff < 0 else 'dense lower or equal'}); MoE {when} "
                         f"(evaluated every {m.train_config.get('eval_interval', '?')} steps).</p>")
    return table + "".join(notes)


def _routing_table(run: RunMetrics, label: str) -> str:
    t = run.train_config
    threshold, window = t.get("dead_threshold", 0.02), t.get("collapse_window", 50)
    last = min(10, len(run.step_S))
    head = ["layer", "max/mean load", "CV of load", "max expert share", "dead experts", "drop rate",
            "router entropy (nats)", "balance loss", "z-loss"]
    rows = []
    for layer, r in run.layers.items():
        s = layer_summary(r.counts_SE, last=last, threshold=threshold, window=window)
        tail = slice(-last, None)
        rows.append("<tr>" + "".join([
            f"<td>{html.escape(layer)}</td>",
            _cell(label, f"layer{layer}_max_over_mean", f"{s['max_over_mean']:.2f}"),
            _cell(label, f"layer{layer}_cv", f"{s['cv']:.2f}"),
            _cell(label, f"layer{layer}_max_share", f"{s['max_share']:.1%}"),
            _cell(label, f"layer{layer}_dead", f"{round(s['dead_fraction'] * r.num_experts)} / {r.num_experts}"),
            _cell(label, f"layer{layer}_drop_rate", f"{np.nanmean(r.drop_rate_S[tail]):.2%}"),
            _cell(label, f"layer{layer}_entropy", f"{np.nanmean(r.router_entropy_S[tail]):.3f}"),
            _cell(label, f"layer{layer}_balance", f"{np.nanmean(r.balance_loss_S[tail]):.3f}"),
            _cell(label, f"layer{layer}_z", f"{np.nanmean(r.z_loss_S[tail]):.3f}"),
        ]) + "</tr>")
    return (f'<p class="note">Means over the last {last} logged steps; dead = share below {threshold:.0%} for '
            f"{window} consecutive steps at the last step; CV = std/mean of the per-expert load (0 = balanced, "
            f"{np.sqrt(max(1, next(iter(run.layers.values())).num_experts) - 1):.2f} = one expert takes all).</p>"
            "<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _collapse_list(run: RunMetrics) -> str:
    if not run.collapse_events:
        return '<p class="ok">No collapse warnings were logged.</p>'
    items = "".join(f"<li>step {ev['step']}: {html.escape(ev['message'])}</li>" for ev in run.collapse_events[:30])
    more = f"<li>... {len(run.collapse_events) - 30} more</li>" if len(run.collapse_events) > 30 else ""
    return f'<p class="warn">{len(run.collapse_events)} collapse warning(s):</p><ul>{items}{more}</ul>'


def _shade(share: float, load: float) -> str:
    """Blue background growing with how much more of a kind an expert gets than its overall load."""
    if load <= 0 or share <= load:
        return ""
    alpha = min(1.0, (share / load - 1.0) / 2.0) * 0.55
    return f' style="background: rgba(31,119,180,{alpha:.2f})"'


def _specialization_html(spec: Specialization, top: int = 6) -> str:
    parts = [(f'<p class="note">{spec.tokens:,} held-out tokens in {spec.windows} windows from '
              f"{html.escape(spec.source)}.</p>")]
    if spec.kinds:
        parts.append("<p>Tokens by kind: " + ", ".join(f"{html.escape(k)} {v:.1%}" for k, v in spec.kind_totals.items())
                     + ". Kind columns: the share of all tokens of that kind routed to the expert (top-k "
                     "assignments); shaded when above the expert's overall load. Whitespace in tokens: "
                     "<code>\u2423</code> space, <code>\u21b5</code> newline, <code>\u21e5</code> tab.</p>")
    for ls in spec.layers:
        ratio = ls.same_expert_rate / ls.chance_rate if ls.chance_rate else float("nan")
        parts.append(f"<h4>layer {ls.layer}</h4><p>Consecutive tokens keep the same top-1 expert "
                     f"<b>{ls.same_expert_rate:.1%}</b> of the time; chance (independent choices with these loads) "
                     f"{ls.chance_rate:.1%} ({ratio:.1f}&times;).</p>")
        head = ["expert", "load"] + list(spec.kinds or [])
        rows = []
        for ex in ls.experts:
            kinds = "".join(f"<td{_shade(ex.kind_share[k], ex.load)}>{ex.kind_share[k]:.1%}</td>"
                            for k in spec.kinds or [])
            toks = ", ".join(f"<code>{html.escape(show_token(t['token']))}</code>&nbsp;{t['count']}&nbsp;"
                             f"({t['token_share']:.0%})" for t in ex.top_tokens[:top])
            rows.append(f"<tr><td>{ex.expert}</td><td>{ex.load:.1%}</td>{kinds}<td class=\"tokens\">{toks}</td></tr>")
        parts.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
                     + '<th class="l">most frequent tokens (count, share of that token routed here)</th>'
                     + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    return "".join(parts)


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, *, spec_tokens: int = 4096,
                 title: str = "moekit report") -> Path:
    """Write ``out_dir/report.html`` (self-contained) and its PNGs; return the HTML path.

    spec_tokens: held-out tokens for the specialization tables (0 = skip them); ~4k keeps it to seconds.
    """
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("write_report needs at least one run directory")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [load_metrics(d) for d in run_dirs]
    labels = run_labels(run_dirs)
    params = [model_params(r.model_config) for r in runs]
    # 1. the runs side by side
    body = [f"<h1>{html.escape(title)}</h1>",
            f'<p class="meta">{len(runs)} run(s), generated {datetime.datetime.now():%Y-%m-%d %H:%M} from '
            + ", ".join(f"<code>{html.escape(str(d))}</code>" for d in run_dirs) + "</p>",
            "<h2>Runs</h2>", _runs_table(runs, labels, params),
            "<h2>Loss</h2>",
            _img(plot_losses(runs, labels, out_dir / "loss.png"), "train and validation loss",
                 "Training loss (faint: per step; solid: moving average) and validation loss (dashed, dots), "
                 "against steps (left) and wall-clock time (right).")]
    versus = plot_moe_vs_dense(runs, out_dir / "moe_vs_dense.png")
    if versus is not None:
        body += ["<h2>MoE vs dense</h2>", seeds_table(runs),
                 _img(versus, "MoE minus dense val loss",
                      "Left: validation loss over the second half of training, zoomed to its range (the mean of the "
                      "seeds; band: their min..max). Right: MoE &minus; dense validation loss at each evaluation, "
                      "per seed (thin), their mean (bold) and spread (band); below 0 means MoE is ahead.")]
    # 2. routing of each MoE run
    for run, label, run_dir in zip(runs, labels, run_dirs):
        if not run.is_moe:
            body.append(f"<h2>{html.escape(label)}</h2><p>Dense model: no routing to show.</p>")
            continue
        slug = _slug(label)
        body += [f"<h2>Routing: {html.escape(label)}</h2>", _routing_table(run, label), _collapse_list(run),
                 _img(plot_expert_load(run, label, out_dir / f"load_{slug}.png"), f"expert load of {label}",
                      "Expert-load heatmaps, one per MoE layer: rows are experts, columns logged steps, colour the "
                      "expert's share of the layer's assignments. The colour scale is set by the second half of "
                      "training (its 99th percentile), so the lasting imbalance shows; brighter early spikes "
                      "saturate."),
                 _img(plot_routing_health(run, label, out_dir / f"health_{slug}.png"), f"routing health of {label}",
                      "Routing health per layer: load imbalance, dead experts, router entropy, capacity drops, "
                      "experts per token (dynamic routers), and the balance and z auxiliary losses (before their "
                      "coefficients). A quantity that is 0 at every step gets no panel: the title says which.")]
        body.append(f"<h3>Expert specialization: {html.escape(label)}</h3>")
        if spec_tokens <= 0:
            body.append('<p class="note">Skipped (spec_tokens=0).</p>')
            continue
        try:
            spec = inspect_run(run_dir, max_tokens=spec_tokens, window=256)
        except (OSError, ValueError, RuntimeError) as e:  # no weights yet, no data, damaged checkpoint
            body.append(f'<p class="warn">Specialization not available: {html.escape(str(e))}</p>')
            continue
        body.append(_specialization_html(spec))
    body.append(f'<p class="note">Regenerate with <code>moekit report '
                f'{html.escape(" ".join(str(d) for d in run_dirs))} --out {html.escape(str(out_dir))}</code></p>')
    page = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    return atomic_write(out_dir / "report.html", page)
