"""`moekit bench train` on a tiny model: interleaved rounds whose ratios are the step-time ratios, the twin's
equal active parameters, the JSON record, and the flags it refuses."""
from __future__ import annotations

import json
import statistics

import pytest

from moekit.cli.bench import main
from moekit.cli.train import build_parser, resolve_configs
from moekit.nn.transformer import MoETransformer
from moekit.train.compare import dense_baseline

from .conftest import TINY_MODEL

# the tiny model's flags without --threads, which the benchmark takes itself
assert TINY_MODEL[-2] == "--threads"
MODEL = TINY_MODEL[:-2]


def test_rounds_alternate_and_the_ratios_are_the_step_time_ratios(tmp_path, corpus, capsys):
    out = tmp_path / "bench.json"
    code = main(["train", "--rounds", "3", "--steps", "2", "--warmup", "1", "--threads", "1",
                 "--work", str(tmp_path / "data"), "--json", str(out), "--", "--data", str(corpus), *MODEL])
    assert code == 0
    res = json.loads(out.read_text())
    rounds = res["rounds"]
    assert [r["order"] for r in rounds] == [["moe", "dense"], ["dense", "moe"], ["moe", "dense"]]
    for r in rounds:
        assert r["moe_over_dense_tokens_per_s"] == pytest.approx(r["dense_step_s"] / r["moe_step_s"])
    ratios = [r["moe_over_dense_tokens_per_s"] for r in rounds]
    summary = res["moe_over_dense_tokens_per_s"]
    assert summary["median"] == pytest.approx(statistics.median(ratios))
    assert summary["q1"] <= summary["median"] <= summary["q3"]
    assert res["tokens_per_step"] == 4 * 32
    for name in ("moe", "dense"):
        step_s = statistics.median(r[f"{name}_step_s"] for r in rounds)
        assert res[name]["step_s"] == pytest.approx(step_s)
        assert res[name]["tokens_per_s"] == pytest.approx(res["tokens_per_step"] / step_s)

    # the twin: the MoE's active parameters per token bar the router's D x E per layer, fewer in total
    mcfg, _ = resolve_configs(build_parser().parse_args(MODEL))
    moe, dense = MoETransformer(mcfg).num_params(), MoETransformer(dense_baseline(mcfg)).num_params()
    assert res["moe"]["active_params"] - res["dense"]["active_params"] == \
        moe["active_params"] - dense["active_params"] == 2 * 32 * 4
    assert res["dense"]["total_params"] < res["moe"]["total_params"]
    assert res["settings"]["dtype"] == "float32"

    printed = capsys.readouterr().out
    assert f"median {summary['median']:.3f} over 3 interleaved rounds" in printed


@pytest.mark.parametrize("flag", ["--out", "--resume", "--steps"])
def test_flags_the_benchmark_decides_are_refused_with_a_message(flag, corpus, capsys):
    code = main(["train", "--rounds", "1", "--steps", "1", "--", "--data", str(corpus), flag, "x"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{flag}: moekit bench train decides these itself; drop them" in err
    assert "Traceback" not in err


def test_zero_rounds_or_threads_is_a_usage_error(capsys):
    assert main(["train", "--rounds", "0"]) == 2
    assert "--rounds 0 must be >= 1" in capsys.readouterr().err
    assert main(["train", "--threads", "0"]) == 2
    assert "--threads 0 must be >= 1" in capsys.readouterr().err
