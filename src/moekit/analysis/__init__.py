"""Routing analysis: load statistics, collapse detection, specialization, plots and reports.

  stats.py           pure numpy over expert-load tables; ``load_metrics(run_dir)`` reads metrics.jsonl
  collapse.py        ``CollapseDetector`` (used by the trainer) and its offline ``replay_collapse``
  specialization.py  which tokens / kinds of text each expert gets (``moekit inspect``)
  plots.py           PNG figures (matplotlib on an Agg canvas, imported when called)
  report.py          ``write_report(run_dirs, out_dir)``: one self-contained HTML file (``moekit report``)

No side effects at import: matplotlib is imported inside the plotting functions, the model and
tokenizer inside the loaders.
"""
from moekit.train.monitor import CollapseDetector, replay_collapse
from moekit.analysis.report import write_report
from moekit.analysis.specialization import Specialization, inspect_run, load_run_model
from moekit.analysis.stats import (
    RunMetrics,
    coefficient_of_variation,
    dead_fraction,
    load_metrics,
    load_shares,
    max_over_mean,
)

__all__ = [
    "CollapseDetector",
    "RunMetrics",
    "Specialization",
    "coefficient_of_variation",
    "dead_fraction",
    "inspect_run",
    "load_metrics",
    "load_run_model",
    "load_shares",
    "max_over_mean",
    "replay_collapse",
    "write_report",
]
