"""`moekit serve --expert-memory`: a server whose routed experts stay on disk behind a cache answers
exactly what the resident model generates, and reports its cache in /metrics, /v1/experts/stats and
`moekit bench serve`."""
from __future__ import annotations

import json

import httpx
import pytest
import torch
from _serve_helpers import LiveServer
from prometheus_client.parser import text_string_to_metric_families

from moekit.cli.bench import main as bench_main
from moekit.infer import generate
from moekit.infer.cache import Trace, replay
from moekit.serve.cli import build_parser, load_engine

OFFLOAD = {"expert_memory": 0, "policy": "lru", "prefetch": True, "read": "pread"}  # no cache: reads every call


@pytest.fixture(scope="module")
def offloaded(run_dir, tmp_path_factory):
    trace = tmp_path_factory.mktemp("trace") / "trace.json"
    budget = {**OFFLOAD, "expert_memory": "all"}  # every expert cached on first use: hits and misses both
    srv = LiveServer(lambda metrics: load_engine(str(run_dir), metrics, offload=budget, trace=str(trace),
                                                 threads=1, max_batch=4))
    srv.wait_ready()
    yield srv, trace
    srv.stop()


def _greedy(url: str, ids: list[int], n: int) -> list[int]:
    r = httpx.post(f"{url}/v1/completions", json={"prompt": ids, "max_tokens": n, "temperature": 0,
                                                   "ignore_eos": True, "return_token_ids": True}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_offloaded_server_answers_what_the_resident_model_generates(offloaded, model_tok):
    srv, _ = offloaded
    model, _ = model_tok
    for seed in range(3):
        ids = torch.randint(10, 290, (9 + 4 * seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        want = generate(model, torch.tensor([ids]), 12, temperature=0)[0, len(ids):].tolist()
        assert _greedy(srv.url, ids, 12) == want


def test_cache_metrics_add_up_to_the_stats(offloaded):
    srv, _ = offloaded
    _greedy(srv.url, list(range(20, 40)), 8)
    stats = httpx.get(f"{srv.url}/v1/experts/stats", timeout=10).json()["cache"]
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{srv.url}/metrics", timeout=10).text)}

    def total(name):
        return sum(s.value for s in fams[name].samples if s.name.endswith("_total"))

    assert total("moekit:expert_cache_hits") == stats["hits"] > 0
    assert total("moekit:expert_cache_misses") == stats["misses"] > 0
    assert stats["hits"] + stats["misses"] == stats["accesses"]
    # every expert is read once, on a miss or ahead of its call by the prefetcher ("all": nothing evicted)
    read = (stats["misses"] + stats["prefetched"]) * stats["expert_bytes"]
    assert total("moekit:expert_cache_read_bytes") == stats["bytes_read"] == read
    assert fams["moekit:expert_cache_capacity_experts"].samples[0].value == stats["capacity_experts"]
    assert set(stats["per_layer"]) == {str(s.labels["layer"]) for s in fams["moekit:expert_cache_hits"].samples}


def test_the_trace_written_at_shutdown_replays_to_the_live_counts(run_dir, tmp_path):
    trace = tmp_path / "trace.json"
    budget = {**OFFLOAD, "expert_memory": "all", "policy": "lfu"}
    srv = LiveServer(lambda metrics: load_engine(str(run_dir), metrics, offload=budget, trace=str(trace),
                                                 threads=1, max_batch=4))
    srv.wait_ready()
    try:
        _greedy(srv.url, list(range(30, 45)), 6)
        live = httpx.get(f"{srv.url}/v1/experts/stats", timeout=10).json()["cache"]
    finally:
        srv.stop()
    t = Trace.load(trace)
    assert len(t.accesses()) == live["accesses"] > 0
    assert replay(t, "lfu")["hits"] == live["hits"]


def test_serve_and_bench_take_the_offload_flags(run_dir, tmp_path):
    args = build_parser().parse_args([str(run_dir), "--expert-memory", "0", "--expert-cache", "lfu", "--no-prefetch",
                                      "--read", "mmap", "--trace", "t.json"])
    assert (args.expert_memory, args.expert_cache, args.prefetch, args.read, args.trace) == ("0", "lfu", False,
                                                                                            "mmap", "t.json")
    out = tmp_path / "bench.json"
    assert bench_main(["serve", str(run_dir), "--concurrency", "1", "--requests", "3", "--prompt-len", "12",
                       "--output-len", "6", "--threads", "1", "--no-baseline", "--expert-memory", "0",
                       "--json", str(out)]) == 0
    run = json.loads(out.read_text())["runs"][str(run_dir)]
    level = run["levels"]["1"]
    assert level["failed"] == 0 and level["output_tokens"] == 18
    assert level["expert_hit_rate"] is not None and 0 <= level["expert_hit_rate"] < 1  # no cache: few hits
    assert level["expert_bytes_read_per_token"] > 0
    assert run["info"]["params"]["total_params"] > run["info"]["params"]["active_params"] > 0
