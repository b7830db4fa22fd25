"""`moekit bench serve` end to end on the tiny run: every level is measured and written to --json."""
from __future__ import annotations

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
