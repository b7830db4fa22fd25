"""`moekit bench serve` end to end on the tiny run: every level is measured and written to --json."""
from __future__ import annotations

import argparse
import json

from moekit.cli.bench import main as bench_main


def test_bench_serve_reports_every_level(run_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_main(["serve", str(run_dir), "--concurrency", "1,2", "--requests", "4", "--prompt-len", "16",
                       "--output-len", "8", "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    run = report["runs"][str(run_dir)]
    assert run["exit_code"] == 0 and run["peak_memory_bytes"]["RssAnon"] > 0 and run["peak_memory_bytes"]["RssFile"] > 0
    assert run["info"]["params"]["total_params"] > run["info"]["params"]["active_params"] > 0
    for level in ("1", "2"):
        s = run["levels"][level]
        assert s["failed"] == 0 and s["output_tokens"] == 4 * 8  # ignore_eos: every request runs to its length
        assert 0 < s["ttft_s"]["median"] <= s["e2e_s"]["median"] and s["itl_s"]["p99"] >= s["itl_s"]["median"] > 0
    assert run["levels"]["2"]["greedy_agreement_with_first_level"] >= 0.9
    assert "out tok/s" in capsys.readouterr().out


def test_a_compiled_server_gets_a_compiled_baseline(run_dir):
    """With --serve-arg=--compile the in-process baseline decodes compiled too, so the HTTP overhead ratio
    compares like with like; without it, eager; and the table names which one it ran."""
    import torch

    from moekit.bench.serve_run import _baseline_decoder, _generate_per_token, add_arguments, table
    from moekit.infer import CompiledDecoder, load_run

    p = argparse.ArgumentParser()
    add_arguments(p)
    model, _ = load_run(run_dir)
    assert _baseline_decoder(model, p.parse_args([str(run_dir)])) is False
    dec = _baseline_decoder(model, p.parse_args([str(run_dir), "--serve-arg=--compile"]))
    assert isinstance(dec, CompiledDecoder)
    with torch.no_grad():
        per_token = _generate_per_token(model, [[1, 2, 3, 4]], 6, dec)
    assert per_token > 0 and dec.steps > 0  # generate() stepped through the compiled decoder
    info = {"generate_s_per_token_median": per_token, "generate_compiled": True}
    assert "in-process generate(compile=True):" in table("run", {}, info, None)


def test_metrics_work_of_a_compiled_step_counts_nothing_on_the_host(monkeypatch):
    """A compiled step's counts come out of its graph: the isolated metrics timing must not charge it the eager
    path's bincounts, while the eager timing does run them."""
    import torch

    from moekit.bench.serve import metrics_work_per_step

    calls = []
    real = torch.bincount
    monkeypatch.setattr(torch, "bincount", lambda *a, **k: calls.append(1) or real(*a, **k))
    eager = metrics_work_per_step(4, 8, 2, 4, reps=50)
    eager_calls = len(calls)
    compiled = metrics_work_per_step(4, 8, 2, 4, reps=50, compiled=True)
    # the graph's stand-in counts once per call (4 layers), then eagerly one per layer per step (50 + warm-up)
    assert eager_calls == 4 + 4 * 51
    assert len(calls) - eager_calls == 4
    assert 0 < compiled and 0 < eager
