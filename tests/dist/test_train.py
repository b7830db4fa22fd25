"""ep=2 x dp=2 training on 4 processes gives the losses and weights of one process on the global batch."""
from __future__ import annotations

import json
import math

from _run_workers import train_configs

from moekit.nn.transformer import MoETransformer
from moekit.parallel import load_dcp
from moekit.rundir import load_weights
from moekit.train.loop import train


def test_ep2_dp2_training_matches_one_process(world4, tiny_data, tmp_path) -> None:
    mcfg, tcfg = train_configs()
    ref_dir = tmp_path / "ref"
    train(mcfg, tcfg, ref_dir, tiny_data, label="ref")
    ref = [json.loads(line) for line in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    got = world4["ranks"][0]["metrics"]
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3, 4]
    for a, b in zip(got, ref):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a["step"], a["loss"], b["loss"])
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4), (a["step"], a["grad_norm"], b["grad_norm"])
        # routing counts are summed over the ranks: the global batch's counts
        assert a["tokens_per_expert"] == b["tokens_per_expert"]
    assert math.isclose(got[-1]["val_loss"], ref[-1]["val_loss"], rel_tol=1e-5)
    # all-to-all traffic is logged per rank, every step
    for r in got:
        assert len(r["a2a_bytes_sent_per_rank"]) == 4 and len(r["a2a_s_per_rank"]) == 4
        assert all(b > 0 for b in r["a2a_bytes_sent_per_rank"]) and r["a2a_bytes_sent"] > 0
    # the final DCP checkpoint, loaded on one process, holds the single-process run's weights (up to fp32
    # rounding of the gradient sums, which Adam's normalisation amplifies to ~1e-6 after 4 steps)
    model = MoETransformer(mcfg)
    load_dcp(world4["run_dir"] / "dcp", model)
    ref_model = MoETransformer(mcfg)
    load_weights(ref_model, ref_dir / "model.safetensors")
    for (k, v), (_, w) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        err = float((v - w).abs().max())
        assert err < 5e-5, f"{k}: max abs diff {err} (shape {tuple(v.shape)}, shard {v.shape[0]})"


def test_rank_metrics_are_written_per_rank(world4) -> None:
    for rank in (1, 2, 3):
        recs = world4["ranks"][rank]["metrics"]
        assert [r["step"] for r in recs] == [1, 2, 3, 4]
        # the logged loss is the global one on every rank
        assert [r["loss"] for r in recs] == [r["loss"] for r in world4["ranks"][0]["metrics"]]
    assert (world4["run_dir"] / "ranks" / "rank3" / "metrics.jsonl").is_file()
