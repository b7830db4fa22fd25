"""`moekit sweep`'s bookkeeping on a tiny budget: equal active parameters at every expert count (counted
exactly), a killed sweep resumed without retraining finished runs, and sweep.json and the report matching
the runs' metrics."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moekit.cli.sweep import main as sweep_main
from moekit.cli.train import build_parser, resolve_configs
from moekit.nn.transformer import MoETransformer
from moekit.train.compare import dense_baseline

SMALL = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--expert-hidden", "48", "--vocab-size", "300",
         "--seq-len", "32", "--batch-size", "4", "--eval-interval", "3", "--eval-batches", "2",
         "--ckpt-interval", "3", "--warmup-steps", "2"]


def _flags(corpus):
    return ["--data", str(corpus), *SMALL]


@pytest.mark.parametrize("top_k", [1, 2])
def test_every_expert_count_has_the_dense_twins_active_parameters(top_k):
    """Active parameters per token differ only by the router's D x E weights per MoE layer."""
    def active(experts: int) -> int:
        mcfg, _ = resolve_configs(build_parser().parse_args([*SMALL, "--experts", str(max(experts, top_k)),
                                                             "--top-k", str(top_k)]))
        return MoETransformer(dense_baseline(mcfg) if experts == 1 else mcfg).num_params()["active_params"]

    d, layers = 32, 2
    dense = active(1)
    for e in (2, 4, 8, 16):
        if e >= top_k:
            assert active(e) == dense + layers * d * e, e


def _manifest_step(path):
    try:
        return json.loads((path / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def test_a_killed_sweep_resumes_and_reports_what_the_metrics_say(tmp_path, corpus):
    out = tmp_path / "sweep"
    argv = ["--experts", "1,2", "--steps", "12", "--seeds", "2", "--jobs", "1", "--out", str(out), "--",
            *_flags(corpus)]
    proc = subprocess.Popen([sys.executable, "-m", "moekit", "sweep", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    # kill the whole sweep (its training process too) once the first run is done and the second started
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if _manifest_step(out / "dense" / "seed0") == 12 and 0 < _manifest_step(out / "e2" / "seed0") < 12:
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    finished = out / "dense" / "seed0" / "model.safetensors"
    assert _manifest_step(out / "dense" / "seed0") == 12
    before = finished.stat().st_mtime_ns

    assert sweep_main(argv) == 0
    assert finished.stat().st_mtime_ns == before  # not trained again
    summary = json.loads((out / "sweep.json").read_text())
    assert [r["experts"] for r in summary["runs"]] == [1, 2] and summary["seeds"] == [0, 1]
    for row in summary["runs"]:
        assert set(row) >= {"experts", "total_params", "active_params", "final_val_loss", "tokens_per_s",
                            "wall_s", "speedup", "per_seed"}
        for seed_row in row["per_seed"]:
            recs = [json.loads(ln) for ln in
                    (Path(seed_row["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
            assert [r["step"] for r in recs] == list(range(1, 13))  # resumed: each step logged once
            vals = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
            assert seed_row["final_val_loss"] == vals[-1][1]
            dense_final = next(s for s in summary["runs"] if s["experts"] == 1)["per_seed"][seed_row["seed"]]
            reach = next((s for s, v in vals if v <= dense_final["final_val_loss"]), None)
            assert seed_row["step_reaching_dense_final"] == reach
            assert seed_row["speedup"] == (12 / reach if reach else None)
        v = row["final_val_loss"]
        assert v["mean"] == pytest.approx(sum(v["per_seed"]) / 2)
    assert summary["runs"][1]["total_params"] > summary["runs"][0]["total_params"]
    # the same sweep with one more expert count trains only the new runs
    grown = ["--experts", "1,2,3", *argv[2:]]
    assert sweep_main(grown) == 0
    assert finished.stat().st_mtime_ns == before
    assert [r["experts"] for r in json.loads((out / "sweep.json").read_text())["runs"]] == [1, 2, 3]
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2
    assert (out / "sweep_loss_vs_params.png").is_file() and (out / "sweep_loss_curves.png").is_file()


def test_the_sweep_refuses_flags_it_sets_and_another_plan_in_the_same_dir(tmp_path, corpus, capsys):
    out = tmp_path / "sweep"
    assert sweep_main(["--experts", "1,2", "--out", str(out), "--", "--steps", "5"]) == 2
    assert "--steps: the sweep sets these for each run itself" in capsys.readouterr().err
    assert sweep_main(["--experts", "1,2,3", "--top-k", "4", "--out", str(out)]) == 2
    assert "fewer experts than --top-k 4" in capsys.readouterr().err
    (out).mkdir()
    (out / "sweep_plan.json").write_text(json.dumps({"experts": [1, 4]}))
    assert sweep_main(["--experts", "1,2", "--out", str(out), "--", *_flags(corpus)]) == 2
    assert "holds another sweep" in capsys.readouterr().err


def test_a_switch_sweep_prepares_its_data(tmp_path, corpus):
    """The data is prepared from the runs' flags: a top-1 router must get the sweep's --top-k there too."""
    from moekit.cli.sweep import _prepare_data, build_parser, plan_runs

    args, _ = build_parser().parse_known_args(["--experts", "1,4", "--top-k", "1", "--seeds", "1",
                                                    "--out", str(tmp_path)])
    plan = plan_runs(args, ["--router", "switch", *_flags(corpus)])
    _prepare_data(plan, tmp_path)
    for e in (1, 4):
        d = tmp_path / ("dense" if e == 1 else f"e{e}") / "seed0" / "data"
        assert (d / "meta.json").is_file() and (d / "train.bin").stat().st_nlink >= 2  # hard links
