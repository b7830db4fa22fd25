"""moekit.analysis.stats on hand-built routing tables (uniform, collapsed, one dead expert) and on logs.

Legend: S steps, E experts.
"""
from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.analysis.stats import (
    coefficient_of_variation,
    counts_from_stats,
    dead_experts,
    dead_fraction,
    drop_rate,
    layer_summary,
    load_metrics,
    load_shares,
    max_over_mean,
    median_tokens_per_s,
    router_entropy,
)

S, E = 6, 4
UNIFORM_SE = np.full((S, E), 25)
COLLAPSED_SE = np.tile([100, 0, 0, 0], (S, 1))
ONE_DEAD_SE = np.tile([34, 33, 33, 0], (S, 1))


@pytest.mark.parametrize("counts_SE, cv, mom, dead", [
    (UNIFORM_SE, 0.0, 1.0, 0.0),
    (COLLAPSED_SE, math.sqrt(E - 1), float(E), (E - 1) / E),
    (ONE_DEAD_SE, np.std([34, 33, 33, 0]) / 25, 34 / 25, 1 / E),
])
def test_table_statistics(counts_SE, cv, mom, dead):
    np.testing.assert_allclose(load_shares(counts_SE).sum(axis=1), 1.0)
    np.testing.assert_allclose(coefficient_of_variation(counts_SE), cv)
    np.testing.assert_allclose(max_over_mean(counts_SE), mom)
    frac_S = dead_fraction(counts_SE, threshold=0.02, window=3)
    np.testing.assert_allclose(frac_S[:2], 0.0)  # not yet dead for a full window
    np.testing.assert_allclose(frac_S[2:], dead)
    summary = layer_summary(counts_SE, last=3, threshold=0.02, window=3)
    assert summary["dead_fraction"] == pytest.approx(dead)
    assert summary["cv"] == pytest.approx(cv)


def test_dead_needs_consecutive_steps():
    counts_SE = np.tile([30, 30, 40, 0], (7, 1))
    counts_SE[3] = [25, 25, 25, 25]  # the expert comes back for one step: its streak restarts
    dead_SE = dead_experts(counts_SE, threshold=0.02, window=3)
    assert dead_SE[:, :3].sum() == 0
    assert dead_SE[:, 3].tolist() == [False, False, True, False, False, False, True]


def test_empty_steps_and_single_rows():
    assert load_shares([[0, 0, 0]]).tolist() == [[0, 0, 0]]
    assert coefficient_of_variation([0, 0]).tolist() == [0.0]
    assert not dead_experts([[0, 0], [0, 0]], window=1).any()  # no tokens routed: nothing is dead
    np.testing.assert_allclose(max_over_mean([1, 3]), [1.5])


def test_router_entropy_and_drop_rate():
    assert router_entropy(np.full((5, E), 1 / E)) == pytest.approx(math.log(E))
    assert router_entropy(np.eye(E)) == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(drop_rate([0, 5, 0], [10, 20, 0]), [0.0, 0.25, 0.0])


def test_counts_from_model_stats():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=8, d_hidden=16, num_experts=E, top_k=2))
    out = layer(torch.randn(2, 5, 8))
    counts = counts_from_stats({3: out.stats})
    assert list(counts) == ["3"]
    assert counts["3"].tolist() == out.stats.tokens_per_expert.tolist()
    assert counts["3"].sum() == 2 * 5 * 2  # every token, twice


def _rec(step, counts, **extra):
    return {"step": step, "loss": 5.0 - step / 10, "aux_loss": 0.01, "lr": 1e-3, "tokens_per_s": 100.0 + step,
            "elapsed_s": float(step), "grad_norm": 1.0, "tokens_per_expert": {"0": counts},
            "drop_rate": {"0": 0.0}, "balance_loss": {"0": 1.0}, "z_loss": {"0": 2.0},
            "router_entropy": {"0": 1.3}, "max_over_mean_load": {"0": 1.0}} | extra


def test_load_metrics_handles_resume_and_torn_line(tmp_path):
    lines = [_rec(1, [5, 5]), _rec(2, [9, 1]), _rec(2, [6, 4], val_loss=4.5),  # step 2 re-logged by a resume
             _rec(3, [10, 0], collapse=[{"step": 3, "layer": "0", "kind": "dead", "expert": 1, "message": "m"}])]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')
    run = load_metrics(tmp_path)
    assert run.step_S.tolist() == [1, 2, 3]
    assert run.layers["0"].counts_SE.tolist() == [[5, 5], [6, 4], [10, 0]]
    assert run.val_step_V.tolist() == [2] and run.final_val_loss == 4.5
    assert [e["kind"] for e in run.collapse_events] == ["dead"]
    assert run.is_moe and run.layers["0"].num_experts == 2


def test_load_metrics_dense_run_and_missing_dir(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0, "aux_loss": 0.0, "lr": 1e-3,
                                                        "tokens_per_s": 10.0, "elapsed_s": 1.0, "grad_norm": 1.0}))
    run = load_metrics(tmp_path)
    assert not run.is_moe and run.final_val_loss is None
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        load_metrics(tmp_path / "nope")


def test_median_tokens_per_s_is_the_trainers_figure():
    tps = [1.0] * 3 + list(range(10, 40))
    assert median_tokens_per_s(tps) == statistics.median(tps[len(tps) // 10:])
    assert median_tokens_per_s([]) == 0.0
