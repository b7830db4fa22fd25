"""A distributed run stopped after N steps and resumed for N more equals the uninterrupted 2N-step run.

The uninterrupted run is ep=2 x dp=2 on 4 ranks; the resumes reshard the model *and* the optimizer state
to ep=4, ep=1 (dp=4) and one process. Right after the load every rank's Adam moments are exactly its
rows of the saved global ones; after the N resumed steps losses agree to rel 1e-5 and the moments to
fp32 reduction-order noise (gradient sums over another number of ranks). Without the optimizer state
the resumed losses differ, so the comparison can fail.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from _resume_workers import N, opt_moments, resume_configs, snapshot_after_load

from moekit.nn.transformer import MoETransformer
from moekit.parallel import load_dcp
from moekit.train.distributed import DistributedRuntime
from moekit.train.loop import build_optimizer, train

RTOL_LOSS = 1e-5


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _global_moments(dcp_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer state of a DCP checkpoint, read on one process: full (E, ...) expert tensors."""
    mcfg, tcfg = resume_configs()
    model = MoETransformer(mcfg)
    opt = build_optimizer(model, tcfg)
    load_dcp(dcp_dir, model, opt)
    return opt_moments(model, opt)


def _expert_names() -> set[str]:
    """The parameters an expert-parallel layer shards: (E, ...) globally, rows [r*L, (r+1)*L) on EP rank r."""
    return {n for n, _ in MoETransformer(resume_configs()[0]).named_parameters() if ".experts.w_" in n}


@pytest.fixture(scope="module")
def one_process(resume_world4, tiny_data, tmp_path_factory) -> dict:
    """The stopped run resumed on one process (DistributedRuntime without groups reads the DCP)."""
    run = tmp_path_factory.mktemp("one") / "run"
    shutil.copytree(resume_world4["base"] / "half", run)
    mcfg, tcfg = resume_configs()
    rt = DistributedRuntime(None, run)
    seen = snapshot_after_load(rt)
    train(mcfg, tcfg, run, tiny_data, resume=True, runtime=rt, label="one")
    return {"run": run, "loaded": seen["moments"]}


def _resumed(resume_world4, one_process, layout: str) -> tuple[Path, list[dict]]:
    if layout == "one":
        return one_process["run"], [{"ep_rank": 0, "ep_size": 1, "loaded": one_process["loaded"]}]
    return resume_world4["base"] / layout, [r[layout] for r in resume_world4["ranks"]]


def test_the_stop_is_agreed_by_every_rank(resume_world4) -> None:
    for rank, res in enumerate(resume_world4["ranks"]):
        assert res["half"]["step"] == N and res["half"]["interrupted"], (rank, res["half"])
        assert res["full"]["step"] == 2 * N and not res["full"]["interrupted"]
    info = json.loads((resume_world4["base"] / "half" / "dcp" / "moekit.json").read_text())
    assert info["step"] == N and info["ep_size"] == 2 and info["world_size"] == 4


@pytest.mark.parametrize("layout", ["ep4", "ep1", "one"])
def test_resume_matches_the_uninterrupted_run(resume_world4, one_process, layout: str) -> None:
    base = resume_world4["base"]
    run, ranks = _resumed(resume_world4, one_process, layout)
    full, got = _losses(base / "full"), _losses(run)
    assert sorted(got) == list(range(1, 2 * N + 1))
    for step in range(N + 1, 2 * N + 1):
        assert math.isclose(got[step], full[step], rel_tol=RTOL_LOSS), (layout, step, got[step], full[step])
    # 1. right after the load: every rank holds exactly its rows of the saved optimizer state
    saved = _global_moments(base / "half" / "dcp")
    experts = _expert_names()
    for res in ranks:
        L = None
        for name, st in res["loaded"].items():
            for k, v in st.items():
                want = saved[name][k]
                if name in experts and k != "step":  # Adam's step count is a scalar per parameter
                    L = v.shape[0]
                    assert L * res["ep_size"] == want.shape[0], (name, v.shape, want.shape)
                    want = want[res["ep_rank"] * L:(res["ep_rank"] + 1) * L]
                assert torch.equal(v, want), (layout, res["ep_rank"], name, k)
        assert set(res["loaded"]) == set(saved)
        assert L == 4 // res["ep_size"], (layout, L)  # expert slices were compared
    # 2. after the resumed steps: the uninterrupted run's moments, every parameter
    final, ref = _global_moments(run / "dcp"), _global_moments(base / "full" / "dcp")
    assert set(final) == set(ref)
    for name in ref:
        assert float(final[name]["step"]) == float(ref[name]["step"]) == 2 * N
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(final[name][k], ref[name][k], rtol=1e-3, atol=1e-8,
                                       msg=lambda m, name=name, k=k: f"{layout} {name}.{k}: {m}")


def test_resume_without_the_optimizer_state_differs(resume_world4) -> None:
    base = resume_world4["base"]
    full, got = _losses(base / "full"), _losses(base / "no_opt")
    assert math.isclose(got[N + 1], full[N + 1], rel_tol=RTOL_LOSS)  # the weights were loaded
    worst = max(abs(got[s] - full[s]) / abs(full[s]) for s in range(N + 2, 2 * N + 1))
    assert worst > 100 * RTOL_LOSS, worst
    final, ref = _global_moments(base / "no_opt" / "dcp"), _global_moments(base / "full" / "dcp")
    assert any(not torch.allclose(final[n]["exp_avg_sq"], ref[n]["exp_avg_sq"], rtol=1e-3, atol=1e-8) for n in ref)


def test_a2a_bytes_are_the_rows_routing_sends(resume_world4) -> None:
    """Per rank and step: rows sent to the other rank of its EP group x d_model x 4 bytes (fp32), for the
    dispatch and the combine forward, and the same two exchanges reversed in backward."""
    mcfg, _ = resume_configs()
    ranks = resume_world4["ranks"]
    counts = [r["full"]["routing"] for r in ranks]  # rank -> (steps, layers, E) picks per expert
    ep, E = 2, mcfg.moe.num_experts
    L = E // ep
    recs = [json.loads(line) for line in (resume_world4["base"] / "full" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 * N
    row_bytes = mcfg.d_model * 4
    for s, rec in enumerate(recs):
        for r in range(4):
            group = range(r // ep * ep, r // ep * ep + ep)
            mine = slice(ranks[r]["full"]["ep_rank"] * L, (ranks[r]["full"]["ep_rank"] + 1) * L)
            out_rows = int(counts[r][s].sum()) - int(counts[r][s][:, mine].sum())
            in_rows = sum(int(counts[q][s][:, mine].sum()) for q in group if q != r)
            assert rec["a2a_bytes_sent_per_rank"][r] == 2 * (out_rows + in_rows) * row_bytes, (s + 1, r)
        assert rec["a2a_bytes_sent"] == rec["a2a_bytes_sent_per_rank"][0]


def test_setup_errors_are_named(resume_world4) -> None:
    for rank, res in enumerate(resume_world4["ranks"]):
        assert res["errors"]["batch"].startswith("ValueError: batch_size=6 must be divisible by the number of "
                                                 "processes 4"), res["errors"]["batch"]
        msg = res["errors"]["config"]
        assert msg.startswith(f"CollectiveError: rank {rank}: the run config differs across ranks: rank(s) [2] "
                              "disagree with rank 0"), msg


def test_a_corrupt_shard_is_refused_by_every_rank(resume_world4) -> None:
    shard = resume_world4["base"] / "corrupt" / "dcp" / "__1_0.distcp"
    for res in resume_world4["ranks"]:
        msg = res["corrupt"]
        assert msg.startswith(f"the distributed checkpoint is corrupt: {shard}: sha256 "), msg
        assert "nothing was loaded" in msg and res["corrupt_untouched"]
