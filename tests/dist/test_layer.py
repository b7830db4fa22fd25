"""The expert-parallel MoELayer equals the single-process layer: outputs and every gradient, float64.

Reference semantics (see _layer_workers.py): the single-process layer applied to each rank's own
batch (capacity counts each rank's own tokens), losses summed; expert gradients compared slice by
slice, replicated (router, shared expert) gradients summed over the ranks.
"""
from __future__ import annotations

import pytest
from _layer_workers import cases

TOL = 1e-5


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", [f"{r}-{m}" for r, m in cases()])
def test_ep_layer_matches_single_process(case: str, world: int, request) -> None:
    ranks = request.getfixturevalue(f"world{world}")["ranks"]
    for rank, res in enumerate(ranks):
        errs = res["layers"][case]
        bad = {k: v for k, v in errs.items() if not k.startswith("_") and not v <= TOL}
        assert not bad, f"rank {rank} of {world}, {case}: max abs errors above {TOL}: {bad}"
        assert "experts.w_up.grad" in errs and "router.weight.grad" in errs
        # forward: counts + rows out + rows back; backward: the two row exchanges reversed
        assert errs["_calls"] == 5


def test_experts_must_divide_the_group(world4) -> None:
    for res in world4["ranks"]:
        assert "num_experts=6 must be divisible by the expert-parallel world size 4" in res["errors"]["indivisible"]


def test_mismatched_configs_name_the_rank(world4) -> None:
    for rank, res in enumerate(world4["ranks"]):
        msg = res["errors"]["mismatch"]
        assert f"rank {rank}: the MoEConfig differs across ranks: rank(s) [2] disagree with rank 0" in msg, msg
