"""Routing statistics over time: pure numpy functions over expert-load tables, and the metrics loader.

Legend: S logged steps, E experts, T tokens.

A *load table* ``counts_SE`` holds, for one MoE layer, the assignments each expert computed at each
logged step (``tokens_per_expert`` in metrics.jsonl, or ``MoEStats.tokens_per_expert`` of a forward).
Every function here takes arrays and returns arrays; ``load_metrics(run_dir)`` turns a run's
metrics.jsonl into those arrays.
"""
from __future__ import annotations

import json
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moekit.rundir import DamagedFileError, RunDir

__all__ = [
    "LayerRouting",
    "RunMetrics",
    "below_for_window",
    "coefficient_of_variation",
    "counts_from_stats",
    "dead_experts",
    "dead_fraction",
    "drop_rate",
    "layer_summary",
    "load_metrics",
    "load_shares",
    "max_over_mean",
    "median_tokens_per_s",
    "router_entropy",
]


# ---------------------------------------------------------------- pure functions over load tables

def _as_table(counts: Any) -> np.ndarray:
    """(E,) or (S, E) counts -> float (S, E)."""
    a = np.asarray(counts, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"expected counts of shape (steps, experts) or (experts,), got {a.shape}")
    return a


def counts_from_stats(stats: Mapping[Any, Any]) -> dict[str, np.ndarray]:
    """{layer: MoEStats} as the model returns it -> {layer (str): counts_E}, the metrics.jsonl layout."""
    return {str(layer): np.asarray(s.tokens_per_expert.tolist(), dtype=np.int64) for layer, s in stats.items()}


def load_shares(counts_SE: Any) -> np.ndarray:
    """Share of each step's assignments per expert, (S, E); a step with no assignments is all 0."""
    c_SE = _as_table(counts_SE)
    total_S1 = c_SE.sum(axis=1, keepdims=True)
    return np.divide(c_SE, total_S1, out=np.zeros_like(c_SE), where=total_S1 > 0)


def coefficient_of_variation(counts_SE: Any) -> np.ndarray:
    """std / mean of the load over experts at each step, (S,): 0 = perfectly balanced,
    sqrt(E - 1) = everything on one expert."""
    c_SE = _as_table(counts_SE)
    mean_S = c_SE.mean(axis=1)
    return np.divide(c_SE.std(axis=1), mean_S, out=np.zeros_like(mean_S), where=mean_S > 0)


def max_over_mean(counts_SE: Any) -> np.ndarray:
    """Busiest expert's load over the mean load, (S,): 1 = balanced, E = one expert takes everything."""
    c_SE = _as_table(counts_SE)
    mean_S = c_SE.mean(axis=1)
    return np.divide(c_SE.max(axis=1), mean_S, out=np.zeros_like(mean_S), where=mean_S > 0)


def router_entropy(probs_TE: Any) -> float:
    """Mean over tokens of the entropy (nats) of the router's distribution: ln E = undecided, 0 = certain."""
    p_TE = np.asarray(probs_TE, dtype=np.float64)
    return float(-(p_TE * np.log(np.clip(p_TE, 1e-20, None))).sum(axis=-1).mean()) if p_TE.size else 0.0


def drop_rate(dropped_S: Any, assignments_S: Any) -> np.ndarray:
    """Fraction of assignments dropped by the capacity limit, per step."""
    d = np.asarray(dropped_S, dtype=np.float64)
    a = np.asarray(assignments_S, dtype=np.float64)
    return np.divide(d, a, out=np.zeros_like(d), where=a > 0)


def below_for_window(mask_SE: np.ndarray, window: int) -> np.ndarray:
    """True at (s, e) when mask holds for e at all of the ``window`` steps ending at s, (S, E)."""
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    m_SE = np.asarray(mask_SE, dtype=bool)
    run_SE = np.zeros(m_SE.shape, dtype=np.int64)  # consecutive steps the mask has held
    for s in range(m_SE.shape[0]):
        run_SE[s] = np.where(m_SE[s], (run_SE[s - 1] if s else 0) + 1, 0)
    return run_SE >= window


def dead_experts(counts_SE: Any, threshold: float = 0.02, window: int = 50) -> np.ndarray:
    """(S, E) bool: the expert's share stayed below ``threshold`` for the last ``window`` logged steps.

    Same rule as ``CollapseDetector``'s "dead" condition (a step with no assignments counts as not dead).
    """
    c_SE = _as_table(counts_SE)
    active_S1 = c_SE.sum(axis=1, keepdims=True) > 0
    return below_for_window((load_shares(c_SE) < threshold) & active_S1, window)


def dead_fraction(counts_SE: Any, threshold: float = 0.02, window: int = 50) -> np.ndarray:
    """Fraction of a layer's experts that are dead at each step, (S,)."""
    return dead_experts(counts_SE, threshold, window).mean(axis=1)


def layer_summary(counts_SE: Any, *, last: int = 10, threshold: float = 0.02, window: int = 50) -> dict[str, float]:
    """Means over the last ``last`` logged steps: max/mean load, CV, final dead fraction, max share."""
    c_SE = _as_table(counts_SE)
    if c_SE.shape[0] == 0:
        return {"max_over_mean": float("nan"), "cv": float("nan"), "dead_fraction": float("nan"),
                "max_share": float("nan")}
    tail_SE = c_SE[-last:]
    return {
        "max_over_mean": float(max_over_mean(tail_SE).mean()),
        "cv": float(coefficient_of_variation(tail_SE).mean()),
        "dead_fraction": float(dead_fraction(c_SE, threshold, window)[-1]),
        "max_share": float(load_shares(tail_SE).max(axis=1).mean()),
    }


def median_tokens_per_s(tokens_per_s_S: Any) -> float:
    """The trainer's throughput figure: median over steps, skipping the first tenth (warm-up)."""
    t = list(np.asarray(tokens_per_s_S, dtype=np.float64))
    steady = t[len(t) // 10:]
    return float(statistics.median(steady)) if steady else 0.0


# ---------------------------------------------------------------- metrics.jsonl -> arrays

@dataclass(frozen=True)
class LayerRouting:
    """One MoE layer's logged routing over the logged steps (rows align with RunMetrics.step_S)."""

    counts_SE: np.ndarray
    drop_rate_S: np.ndarray
    balance_loss_S: np.ndarray
    z_loss_S: np.ndarray
    router_entropy_S: np.ndarray
    experts_per_token_S: np.ndarray | None = None  # logged by dynamic-k routers' runs (NaN where absent)

    @property
    def num_experts(self) -> int:
        return int(self.counts_SE.shape[1])


@dataclass(frozen=True)
class RunMetrics:
    """A run's metrics.jsonl as arrays, plus its configs (plain dicts; {} when absent)."""

    run_dir: Path
    step_S: np.ndarray
    loss_S: np.ndarray
    aux_loss_S: np.ndarray
    lr_S: np.ndarray
    tokens_per_s_S: np.ndarray
    elapsed_s_S: np.ndarray
    grad_norm_S: np.ndarray
    val_step_V: np.ndarray
    val_loss_V: np.ndarray
    val_elapsed_s_V: np.ndarray
    layers: dict[str, LayerRouting]  # MoE layer index (as logged, a str) -> its routing
    collapse_events: list[dict[str, Any]]
    model_config: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)

    @property
    def is_moe(self) -> bool:
        return bool(self.layers)

    @property
    def final_val_loss(self) -> float | None:
        return float(self.val_loss_V[-1]) if self.val_loss_V.size else None

    @property
    def final_loss(self) -> float | None:
        return float(self.loss_S[-1]) if self.loss_S.size else None

    @property
    def tokens_per_s(self) -> float:
        return median_tokens_per_s(self.tokens_per_s_S)

    @property
    def wall_s(self) -> float:
        return float(self.elapsed_s_S[-1]) if self.elapsed_s_S.size else 0.0


def _read_records(run: RunDir) -> list[dict[str, Any]]:
    """The run's records by step (RunDir.metrics tolerates a torn last line)."""
    by_step = {int(rec["step"]): rec for rec in run.metrics()}  # a resumed run re-logs steps: the last wins
    return [by_step[s] for s in sorted(by_step)]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def load_metrics(run_dir: str | Path) -> RunMetrics:
    """Read ``run_dir/metrics.jsonl`` (+ config.json, train_config.json) into arrays."""
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    recs = _read_records(run)
    if not recs:
        raise DamagedFileError(f"{run.metrics_path}: no records (empty, or truncated before its first line); "
                               "nothing to report for this run")

    def col(key: str, rows: list[dict[str, Any]] = recs) -> np.ndarray:
        return np.array([r.get(key, np.nan) if r.get(key) is not None else np.nan for r in rows], dtype=np.float64)

    layer_names = sorted({k for r in recs for k in r.get("tokens_per_expert", {})}, key=int)
    layers = {}
    routed = [r for r in recs if r.get("tokens_per_expert")]
    if len(routed) == len(recs):  # MoE runs log routing at every logged step
        for layer in layer_names:
            def per_layer(key: str, layer: str = layer) -> np.ndarray:
                return np.array([r.get(key, {}).get(layer, np.nan) for r in recs], dtype=np.float64)

            layers[layer] = LayerRouting(
                counts_SE=np.array([r["tokens_per_expert"][layer] for r in recs], dtype=np.int64),
                drop_rate_S=per_layer("drop_rate"), balance_loss_S=per_layer("balance_loss"),
                z_loss_S=per_layer("z_loss"), router_entropy_S=per_layer("router_entropy"),
                experts_per_token_S=per_layer("experts_per_token"))
    vals = [r for r in recs if "val_loss" in r]
    return RunMetrics(
        run_dir=run_dir,
        step_S=np.array([r["step"] for r in recs], dtype=np.int64),
        loss_S=col("loss"), aux_loss_S=col("aux_loss"), lr_S=col("lr"), tokens_per_s_S=col("tokens_per_s"),
        elapsed_s_S=col("elapsed_s"), grad_norm_S=col("grad_norm"),
        val_step_V=np.array([r["step"] for r in vals], dtype=np.int64),
        val_loss_V=col("val_loss", vals), val_elapsed_s_V=col("elapsed_s", vals),
        layers=layers,
        collapse_events=[ev for r in recs for ev in r.get("collapse", [])],
        model_config=_read_json(run.config_path),
        train_config=_read_json(run.train_config_path),
    )
