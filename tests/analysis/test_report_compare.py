"""The report across seeds and sides: every seed shown with mean ± spread, the MoE − dense difference
readable, the load heatmap scaled by the steady state, no empty routing-health panels, and a run without
metrics refused by name."""
from __future__ import annotations

import json
import shutil
import statistics

import numpy as np

from moekit.analysis.plots import health_panels, load_scale
from moekit.analysis.report import write_report
from moekit.analysis.stats import load_metrics
from moekit.cli.report import main as report_main


def _fake_run(path, src, seed, vals, counts=None, seconds_per_eval=1.0):
    """A run directory with ``src``'s configs, the given seed, and val losses ``vals`` every 10 steps."""
    path.mkdir(parents=True)
    shutil.copy(src / "config.json", path / "config.json")
    tcfg = json.loads((src / "train_config.json").read_text()) | {"seed": seed}
    (path / "train_config.json").write_text(json.dumps(tcfg))
    recs = []
    for i, v in enumerate(vals):
        rec = {"step": 10 * (i + 1), "loss": v + 0.1, "aux_loss": 0.0, "lr": 1e-3, "tokens_per_s": 1000.0,
               "elapsed_s": seconds_per_eval * i, "grad_norm": 1.0, "val_loss": v}
        if counts is not None:
            rec |= {"tokens_per_expert": {"0": counts[i]}, "drop_rate": {"0": 0.0}, "balance_loss": {"0": 1.0},
                    "z_loss": {"0": 0.5}, "router_entropy": {"0": 1.2}, "max_over_mean_load": {"0": 1.0}}
        recs.append(rec)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_every_seed_is_shown_with_mean_and_spread(moe_run, dense_run, tmp_path):
    moe_vals = {0: [4.0, 3.5, 3.40], 1: [4.0, 3.6, 3.42], 2: [4.1, 3.5, 3.38]}
    dense_vals = {0: [4.0, 3.5, 3.41], 1: [4.0, 3.6, 3.43], 2: [4.1, 3.5, 3.37]}
    counts = [[5, 5, 5, 5]] * 3
    runs = [_fake_run(tmp_path / "moe" / f"seed{s}", moe_run[0], s, v, counts) for s, v in moe_vals.items()]
    runs += [_fake_run(tmp_path / "dense" / f"seed{s}", dense_run[0], s, v) for s, v in dense_vals.items()]
    path = write_report(runs, tmp_path / "report", spec_tokens=0)
    page = path.read_text()
    assert (tmp_path / "report" / "moe_vs_dense.png").stat().st_size > 1000
    for s in (0, 1, 2):
        assert f"moe/seed{s}" in page and f"dense/seed{s}" in page
    finals_m = [v[-1] for v in moe_vals.values()]
    finals_d = [v[-1] for v in dense_vals.values()]
    diffs = [m - d for m, d in zip(finals_m, finals_d)]
    assert f'data-metric="moe_mean_val">{statistics.fmean(finals_m):.4f} &plusmn; {statistics.stdev(finals_m):.4f}' in page
    assert f'data-metric="dense_mean_val">{statistics.fmean(finals_d):.4f} &plusmn; ' in page
    assert f'data-metric="diff_mean_val">{statistics.fmean(diffs):.4f} &plusmn; {statistics.stdev(diffs):.4f}' in page
    assert "MoE lower in 2 of 3 at equal steps" in page  # seeds 0 and 1: -0.01; seed 2: +0.01
    # equal wall time: both sides log elapsed 0, 1, 2 s at their evaluations, so it is the final difference
    assert f'data-metric="diff_equal_time">{statistics.fmean(diffs):.4f} &plusmn; {statistics.stdev(diffs):.4f}' in page


def test_the_heatmap_scale_comes_from_the_steady_state(moe_run, tmp_path):
    spike = [[100, 0, 0, 0]] * 5  # one expert took everything early on
    steady = [[40, 20, 20, 20]] * 5
    run = _fake_run(tmp_path / "run", moe_run[0], 0, [3.0] * 10, spike + steady)
    scale = load_scale(load_metrics(run))
    assert scale == np.float64(0.4)  # the lasting 40% share, not the early 100%


def test_routing_health_drops_panels_that_are_zero_at_every_step(moe_run):
    run = load_metrics(moe_run[0])  # dropless top-2: no drops, two experts per token at every step
    panels = [(name, fn) for name, fn in [
        ("drop rate (capacity)", lambda r: r.drop_rate_S), ("balance loss", lambda r: r.balance_loss_S)]]
    shown, constant = health_panels(run, panels)
    assert [t for t, _ in shown] == ["balance loss"] and constant == ["drop rate"]


def test_report_of_an_empty_or_truncated_metrics_file_is_an_error_naming_it(moe_run, tmp_path, capsys):
    for content in ("", '{"step": 1, "loss": 3.'):
        run = tmp_path / f"run{len(content)}"
        shutil.copytree(moe_run[0], run)
        (run / "metrics.jsonl").write_text(content)
        assert report_main([str(run), "--spec-tokens", "0"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"moekit report: error: {run / 'metrics.jsonl'}: no records") and err.count("\n") == 1
        assert not (run / "report" / "report.html").exists()


def test_equal_wall_time_compares_the_slower_run_earlier_in_its_training(moe_run, dense_run, tmp_path):
    from moekit.analysis.compare_plots import equal_time_diffs, paired_seeds

    moe = _fake_run(tmp_path / "moe", moe_run[0], 0, [4.0, 3.6, 3.2], [[5, 5, 5, 5]] * 3, seconds_per_eval=2.0)
    dense = _fake_run(tmp_path / "dense", dense_run[0], 0, [4.0, 3.5, 3.4])  # evaluations at 0, 1, 2 s
    [(t, diff)] = equal_time_diffs(paired_seeds([load_metrics(moe), load_metrics(dense)]))
    # at dense's end (2 s) the MoE run is at its second evaluation: 3.6 - 3.4
    assert t == 2.0 and diff == np.float64(3.6 - 3.4)
