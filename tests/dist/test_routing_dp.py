"""Routing under data parallelism: sigmoid_bias's expert bias is updated from the global batch's counts, so it
is identical on every rank and equal to one process's; router noise is drawn independently per rank and
step, and a resumed run draws exactly what the uninterrupted one did."""
from __future__ import annotations

import json
import math

import _spawn
import pytest
import torch
from _routing_workers import routing_configs, routing_world2

from moekit.rundir import RunDir
from moekit.train.loop import train


@pytest.fixture(scope="module")
def world(tiny_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("routing_dp")
    res = _spawn.run(routing_world2, 2, tiny_data, str(base), timeout=240)
    return [r["value"] for r in res], base


def test_the_expert_bias_is_identical_on_every_rank_and_equal_to_one_process(world, tiny_data, tmp_path):
    ranks, _ = world
    b0, b1 = ranks[0]["bias"]["biases"], ranks[1]["bias"]["biases"]
    assert all(torch.equal(a, b) for a, b in zip(b0, b1))
    assert any(float(b.abs().max()) > 0 for b in b0)  # the bias moved: the check can fail
    mcfg, tcfg = routing_configs("sigmoid_bias")
    train(mcfg, tcfg, tmp_path / "one", tiny_data, label="one")
    model = RunDir(tmp_path / "one").load_model()
    ref = [m.router.expert_bias for m in model.moe_layers()]
    for a, b in zip(b0, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_router_noise_is_independent_per_rank_and_step_and_replayed_on_resume(world):
    ranks, _ = world
    d0, d1 = ranks[0]["draws"], ranks[1]["draws"]
    assert torch.equal(d0[0], d0[1])  # the same (seed, step, rank): the same draws
    assert not torch.equal(d0[0], d0[2])  # another step
    assert not torch.equal(d0[0], d1[0])  # another rank
    for r in ranks:
        full, resumed = r["noise_full"]["losses"], r["noise_resumed"]["losses"]
        assert sorted(resumed) == [1, 2, 3, 4]
        for step in (3, 4):
            assert math.isclose(full[step], resumed[step], rel_tol=1e-6), (step, full[step], resumed[step])


def test_global_balance_over_ranks_equals_one_process(world, tiny_data, tmp_path):
    """balance_scope="global": f from both ranks' picks, so the two ranks' objective is one process's on
    the whole batch; with each rank's own f (micro_batch) it is not."""
    ranks, _ = world
    mcfg, tcfg = routing_configs("topk", "global")
    train(mcfg, tcfg, tmp_path / "one", tiny_data, label="one")
    ref = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "one" / "metrics.jsonl").read_text().splitlines())}
    got, per = ranks[0]["balance_global"]["losses"], ranks[0]["balance_micro_batch"]["losses"]
    for step in (1, 2, 3, 4):
        assert math.isclose(got[step], ref[step], rel_tol=1e-5), (step, got[step], ref[step])
    assert max(abs(per[s] - ref[s]) / ref[s] for s in (3, 4)) > 1e-6
