"""The engine in a process of its own (what `moekit serve` runs by default): greedy output over HTTP equals
in-process generate, concurrent requests each get their own complete answer, the metrics observed in the
server process add up to what the child decoded, a load error keeps its name, and a child that dies fails
the requests in flight and turns /health to 503 instead of hanging them."""
from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest
import torch
from _serve_helpers import LiveServer, start_stream
from prometheus_client.parser import text_string_to_metric_families

from moekit.infer import generate
from moekit.serve.cli import load_engine_process


def _values(url: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _complete(url: str, ids: list[int], n: int, **kw) -> dict:
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={"prompt": ids, "max_tokens": n, "temperature": 0,
                                                              "ignore_eos": True, "return_token_ids": True, **kw})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def proc_server(run_dir):
    srv = LiveServer(lambda metrics: load_engine_process(str(run_dir), metrics, threads=1, max_batch=4,
                                                         deterministic=True))
    srv.wait_ready(60)
    yield srv
    srv.stop()


def test_greedy_equals_generate_and_metrics_add_up(proc_server, model_tok):
    model, _ = model_tok
    before = _values(proc_server.url)
    prompts = [list(range(20, 20 + n)) for n in (3, 9, 14)]
    n_new = 12
    for ids in prompts:
        got = _complete(proc_server.url, ids, n_new)["choices"][0]["token_ids"]
        ref = generate(model, torch.tensor([ids]), n_new, temperature=0)[0, len(ids):].tolist()
        assert got == ref
    after = _values(proc_server.url)

    def moved(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert moved("moekit:generation_tokens_total") == len(prompts) * n_new
    assert moved("moekit:prompt_tokens_total") == sum(map(len, prompts))
    assert moved("moekit:request_success_total", (("finished_reason", "length"),)) == len(prompts)
    assert moved("moekit:time_to_first_token_seconds_count") == len(prompts)
    assert moved("moekit:inter_token_latency_seconds_count") == len(prompts) * (n_new - 1)
    assert after[("moekit:num_requests_running", ())] == 0
    fed, k = sum(len(ids) + n_new - 1 for ids in prompts), model.config.moe.top_k
    stats = httpx.get(f"{proc_server.url}/v1/experts/stats", timeout=10).json()
    for layer in range(model.config.n_layers):
        labels = [(("expert", str(e)), ("layer", str(layer))) for e in range(model.config.moe.num_experts)]
        assert sum(moved("moekit:expert_tokens_total", lab) for lab in labels) == fed * k
        assert stats["layers"][str(layer)]["tokens_per_expert"] == [after[("moekit:expert_tokens_total", lab)]
                                                                     for lab in labels]


def test_concurrent_requests_each_complete_and_unmixed(proc_server, model_tok):
    """8 clients x 2 requests, --deterministic: every answer equals that prompt's answer alone."""
    model, _ = model_tok
    prompts = [list(range(40 + i, 46 + 2 * i)) for i in range(8)]
    alone = {i: generate(model, torch.tensor([p]), 8, temperature=0)[0, len(p):].tolist() for i, p in enumerate(prompts)}
    got, errors = {}, []

    def client(i):
        try:
            for r in range(2):
                got[(i, r)] = _complete(proc_server.url, prompts[i], 8)["choices"][0]["token_ids"]
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert got == {(i, r): alone[i] for i in range(8) for r in range(2)}


def test_load_error_keeps_its_name(run_dir, tmp_path):
    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    weights = bad / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    srv = LiveServer(lambda metrics: load_engine_process(str(bad), metrics, threads=1))
    try:
        assert srv.state.ready.wait(60)
        assert srv.state.loaded is None
        assert "CheckpointError" in srv.state.load_error and "model.safetensors" in srv.state.load_error
        r = httpx.get(f"{srv.url}/health", timeout=10)
        assert r.status_code == 503 and r.json()["status"] == "failed"
    finally:
        srv.stop()


def test_a_dead_engine_process_fails_in_flight_requests_and_health(run_dir):
    srv = LiveServer(lambda metrics: load_engine_process(str(run_dir), metrics, threads=1))
    try:
        engine = srv.wait_ready(60).engine
        events, started, t = start_stream(srv.url, 900)
        assert started.wait(30)
        engine._proc.kill()
        t.join(30)
        assert not t.is_alive()
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert "error" in last and "exited unexpectedly" in last["error"]["message"]
        deadline = time.monotonic() + 10
        while httpx.get(f"{srv.url}/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "exited unexpectedly" in httpx.get(f"{srv.url}/health", timeout=5).json()["error"]
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and "exited unexpectedly" in r.json()["error"]["message"]
        # the scrape still answers, at once: what the server saw, nothing running
        t0 = time.monotonic()
        values = _values(srv.url)
        assert time.monotonic() - t0 < 5
        assert values[("moekit:num_requests_running", ())] == 0
        assert values[("moekit:generation_tokens_total", ())] >= 1
    finally:
        srv.stop()


def test_offloaded_engine_process_reports_its_cache_and_writes_the_trace(run_dir, tmp_path):
    from moekit.infer.cache import Trace, replay

    trace = tmp_path / "trace.json"
    offload = {"expert_memory": "all", "policy": "lfu", "prefetch": True, "read": "pread"}
    srv = LiveServer(lambda metrics: load_engine_process(str(run_dir), metrics, threads=1, offload=offload,
                                                         trace=str(trace)))
    try:
        srv.wait_ready(60)
        _complete(srv.url, list(range(30, 45)), 6)
        cache = httpx.get(f"{srv.url}/v1/experts/stats", timeout=10).json()["cache"]
        hits = sum(v for (name, _), v in _values(srv.url).items() if name == "moekit:expert_cache_hits_total")
    finally:
        srv.stop()
    assert cache["accesses"] > 0 and hits == cache["hits"]
    t = Trace.load(trace)  # written by the engine process as it stopped
    assert len(t.accesses()) == cache["accesses"] and replay(t, "lfu")["hits"] == cache["hits"]
