"""`moekit bench generate`: the JSON carries the pinned fields, with values that hold together."""
from __future__ import annotations

import json

from moekit.cli.bench import main
from moekit.rundir import RunDir

PINNED = ("tokens_per_s", "ttft_s", "itl_s", "peak_rss_anon_bytes", "peak_rss_file_bytes", "expert_hit_rate",
          "optimal_hit_rate", "expert_bytes_read_per_token", "bandwidth_gbps_measured", "bandwidth_utilization")


def _rows(doc):
    """The per-batch records, whatever the top-level nesting."""
    if isinstance(doc, dict) and "tokens_per_s" in doc:
        return [doc]
    if isinstance(doc, dict):
        return [r for v in doc.values() for r in _rows(v)]
    if isinstance(doc, list):
        return [r for v in doc for r in _rows(v)]
    return []


def test_bench_generate_offloaded_writes_every_pinned_field(checkpoints, tmp_path):
    run = checkpoints["moekit"]
    out = tmp_path / "b.json"
    assert main(["generate", str(run), "--expert-memory", "147456", "--no-prefetch", "--batch", "1", "--prompt-len", "8",
                 "--new-tokens", "6", "--threads", "1", "--json", str(out)]) == 0
    rows = _rows(json.loads(out.read_text()))
    assert rows, out.read_text()[:500]
    for r in rows:
        assert all(k in r for k in PINNED), sorted(set(PINNED) - set(r))
        assert r["tokens_per_s"] > 0 and r["ttft_s"] > 0
        assert r["itl_s"]["median"] <= r["itl_s"]["p90"] <= r["itl_s"]["p99"]
        assert 0 <= r["expert_hit_rate"] <= r["optimal_hit_rate"] <= 1
        assert r["bandwidth_gbps_measured"] > 0 and r["peak_rss_anon_bytes"] > 0
    assert RunDir(run).is_run()


def test_bench_generate_runs_a_dense_model(checkpoints, tmp_path):
    """The MoE's dense twin has no routed experts: every weight is read per token, nothing is cached."""
    from moekit.nn.transformer import MoETransformer

    moe_run = RunDir(checkpoints["moekit"])
    dense = MoETransformer(moe_run.load_model().config.replace(dense=True)).eval()
    run = RunDir(tmp_path / "dense")
    run.path.mkdir()
    run.save_model(dense)
    out = tmp_path / "d.json"
    assert main(["generate", str(run.path), "--batch", "1", "--prompt-len", "6", "--new-tokens", "4",
                 "--threads", "1", "--json", str(out)]) == 0
    (r,) = _rows(json.loads(out.read_text()))
    weights = sum(t.numel() * t.element_size() for t in dense.state_dict().values())
    assert r["expert_bytes"] == 0 and r["non_expert_bytes"] == weights
    assert r["tokens_per_s"] > 0


def test_bench_generate_compiled_counts_the_same_weights(checkpoints, tmp_path):
    """--compile decodes through the compiled step: the weights a step touches (from the experts it counted)
    equal the eager run's (at batch 2: one graph to compile; batch 1 is `generate --compile`'s own test), and
    the compile time is reported apart; offloaded it is refused."""
    run = str(checkpoints["moekit"])
    common = ["--batch", "2", "--prompt-len", "6", "--new-tokens", "5", "--threads", "1"]
    rows = {}
    for mode in ("eager", "compiled"):
        out = tmp_path / f"{mode}.json"
        assert main(["generate", run, *common, "--json", str(out), *(["--compile"] if mode == "compiled" else [])]) == 0
        rows[mode] = json.loads(out.read_text())["results"]
    assert len(rows["eager"]) == len(rows["compiled"]) == 1
    for eager, comp in zip(rows["eager"], rows["compiled"]):
        assert comp["compiled"] and comp["compile_s"] > 0 and not eager["compiled"]
        assert comp["weights_touched_per_step_bytes"] == eager["weights_touched_per_step_bytes"]
        assert comp["tokens_per_s"] > 0
    assert main(["generate", run, "--expert-memory", "all", "--compile", "--new-tokens", "3"]) == 1
