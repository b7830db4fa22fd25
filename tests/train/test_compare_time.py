"""MoE − dense at equal wall time, from the runs' own metrics: interpolated at the shorter run's end,
with resumed sessions laid end to end."""
from __future__ import annotations

import json

import pytest

from moekit.train.compare import equal_time_difference, format_summary, val_at_time


def _run(path, recs):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_val_at_time_interpolates_and_holds():
    curve = [(10.0, 3.0), (20.0, 2.5)]
    assert val_at_time(curve, 5.0) is None
    assert val_at_time(curve, 15.0) == pytest.approx(2.75)
    assert val_at_time(curve, 30.0) == 2.5


def test_equal_time_difference_at_the_shorter_runs_end(tmp_path):
    moe = _run(tmp_path / "moe", [{"step": 1, "elapsed_s": 10.0, "val_loss": 3.0},
                                  {"step": 2, "elapsed_s": 4.0},  # a resume: elapsed restarts
                                  {"step": 3, "elapsed_s": 10.0, "val_loss": 2.5}])  # t = 20 s in all
    dense = _run(tmp_path / "dense", [{"step": 1, "elapsed_s": 5.0, "val_loss": 3.2},
                                      {"step": 3, "elapsed_s": 15.0, "val_loss": 2.7}])
    got = equal_time_difference(moe, dense)
    assert got == {"seconds": 15.0, "moe": pytest.approx(2.75), "dense": 2.7, "diff": pytest.approx(0.05)}


def test_the_summary_prints_both_comparisons():
    side = {"final_val_loss": 3.0, "tokens_per_s": 1.0, "total_params": 1, "active_params": 1, "wall_s": 1.0,
            "per_seed": [{"seed": 0, "final_val_loss": 3.0, "step_reaching_dense_final": None}]}
    text = format_summary({"steps": 10, "unigram_entropy": 6.0, "moe": side, "dense": side,
                           "moe_minus_dense_val_loss": {"mean": -0.01, "per_seed": [-0.01], "moe_wins": 1},
                           "moe_minus_dense_val_loss_equal_time": {"mean": 0.02, "per_seed": [0.02], "moe_wins": 0,
                                                                   "seconds": [120.0]}})
    assert "at equal steps: mean -0.0100; MoE lower in 1/1" in text
    assert "at equal wall time (the shorter run's 120 s): mean +0.0200; MoE lower in 0/1" in text
    assert "MoE / dense tokens/s: 1.000 (trained one after the other)" in text


def test_the_summary_says_how_the_pair_trained():
    moe = {"final_val_loss": 3.0, "tokens_per_s": 930.0, "total_params": 2, "active_params": 1, "wall_s": 1.0,
           "per_seed": [{"seed": 0, "final_val_loss": 3.0}]}
    dense = moe | {"tokens_per_s": 1000.0}
    text = format_summary({"steps": 10, "unigram_entropy": 6.0, "moe": moe, "dense": dense, "jobs": 2,
                           "moe_minus_dense_val_loss": {"mean": 0.0, "per_seed": [0.0], "moe_wins": 0}})
    assert "MoE / dense tokens/s: 0.930 (trained side by side, a process each)" in text
