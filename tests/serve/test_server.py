"""A real server on 127.0.0.1: the official openai client, greedy identity with generate(), continuous
batching, metrics, and every kind of bad input answered with a 4xx error object while serving goes on."""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
import torch
from _serve_helpers import POISON, LiveServer
from conftest import make_loader
from prometheus_client.parser import text_string_to_metric_families

from moekit.data import EOT, decode, encode
from moekit.infer import generate

PROMPTS = ["def parse_", "    return ", "for x in range(", "if data is None:\n", "def merge_items(items, key",
           "        total = "]


def reference(model_tok, ids: list[int], n: int, *, eos: bool = True) -> list[int]:
    """What `moekit generate --temperature 0` produces for the prompt alone (the library call it makes, cut
    at the end-of-document token as it prints); eos=False: as with --no-stop-at-eot."""
    model, tok = model_tok
    eot = tok.token_to_id(EOT) if eos else None
    out = generate(model, torch.tensor([ids]), n, temperature=0, eos_id=eot)[0, len(ids):].tolist()
    return out[: out.index(eot)] if eot in out else out


def client(srv, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, timeout=30)


def post(srv, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{srv.url}{path}", content=content, timeout=30,
                      headers={"content-type": "application/json", **kw.pop("headers", {})}, **kw)


def metric_values(srv) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{srv.url}/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_completions_with_the_openai_client_equal_generate(live, model_tok):
    _, tok = model_tok
    c = client(live)
    for prompt in PROMPTS[:3]:
        ids = encode(tok, prompt)
        ref = reference(model_tok, ids, 24)
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                                 extra_body={"return_token_ids": True})
        assert r.choices[0].token_ids == ref  # token-identical to generate() alone
        assert r.choices[0].text == decode(tok, ref)
        assert r.choices[0].finish_reason == ("length" if len(ref) == 24 else "stop")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(ref))
        chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref)
        chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                           extra_body={"return_token_ids": True}))
        assert [t for ch in chunks for t in ch.choices[0].token_ids] == ref
        # with ids, one chunk per token (a client times every token, even one whose text is held back)
        assert [len(ch.choices[0].token_ids) for ch in chunks[:-1]] == [1] * len(ref)
        assert "".join(ch.choices[0].text for ch in chunks) == r.choices[0].text
    assert [m.id for m in c.models.list().data] == ["tiny"]


def test_chat_with_the_openai_client_uses_the_template(live, model_tok):
    _, tok = model_tok
    c = client(live)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def parse_"}]
    ids = tok.encode("<system>be brief\n<user>def parse_\n<assistant>", add_special_tokens=False).ids
    ref = reference(model_tok, ids, 16)
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == decode(tok, ref)
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == decode(tok, ref)
    assert chunks[-1].usage.total_tokens == len(ids) + len(ref)


def test_stop_strings_seed_and_sampling(live):
    c = client(live)
    full = c.completions.create(model="tiny", prompt="def parse_", max_tokens=30, temperature=0).choices[0].text
    stop = full[5:8]
    assert stop.strip(), full
    r = c.completions.create(model="tiny", prompt="def parse_", max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="def parse_", max_tokens=30, temperature=0, stop=stop, stream=True) if ch.choices)
    assert streamed == r.choices[0].text  # the stop string is never streamed
    kw = {"model": "tiny", "prompt": "def ", "max_tokens": 20, "temperature": 1.0, "top_p": 0.9}
    a, b, d = (c.completions.create(seed=s, **kw).choices[0].text for s in (1, 1, 2))
    assert a == b and a != d


def test_a_long_request_does_not_hold_up_a_short_one(live):
    c = client(live)
    long_done, seen = threading.Event(), []

    def long_request():
        for ch in c.completions.create(model="tiny", prompt="def ", max_tokens=300, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True}):
            seen.append(ch)  # noqa: PERF402 - one by one: the main thread watches it grow
        long_done.set()

    t = threading.Thread(target=long_request)
    t.start()
    while len(seen) < 3:
        time.sleep(0.01)
    r = c.completions.create(model="tiny", prompt="for ", max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and not long_done.is_set()
    t.join(60)
    assert long_done.is_set()


def _concurrent(srv, prompts, n_tokens):
    out: dict[int, list[int]] = {}

    def one(i, p):
        r = post(srv, "/v1/completions", {"prompt": p, "max_tokens": n_tokens[i], "temperature": 0,
                                          "return_token_ids": True, "ignore_eos": True})
        out[i] = r.json()["choices"][0]["token_ids"]

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
        time.sleep(0.003)  # staggered: requests join a batch that is already running
    for t in threads:
        t.join(60)
    return [out[i] for i in range(len(prompts))]


def test_concurrent_deterministic_is_identical_to_generate_alone(model_tok, chat_dir):
    _, tok = model_tok
    srv = LiveServer(make_loader(model_tok, chat_dir, max_batch=4, deterministic=True))
    try:
        engine = srv.wait_ready().engine
        n = [40, 25, 33, 12, 45, 20]
        got = _concurrent(srv, PROMPTS, n)
        assert got == [reference(model_tok, encode(tok, p), k, eos=False) for p, k in zip(PROMPTS, n)]
        assert engine._forwards >= sum(n)  # every token of every request had a forward of its own
    finally:
        srv.stop()


def test_concurrent_batched_decodes_several_requests_per_forward(live, model_tok):
    _, tok = model_tok
    engine = live.state.loaded.engine
    steps0 = engine.steps
    n = [40, 25, 33, 12, 45, 20]
    got = _concurrent(live, PROMPTS, n)
    assert [len(g) for g in got] == n
    assert engine.steps - steps0 < sum(n) / 2  # tokens of several requests came out of one step
    ref = [reference(model_tok, encode(tok, p), k, eos=False) for p, k in zip(PROMPTS, n)]
    same = sum(a == b for g, r in zip(got, ref) for a, b in zip(g, r))
    assert same / sum(n) >= 0.95  # batched GEMMs may reorder reductions; measured 100% on this model


BAD = [  # (body, status, param or None)
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"max_tokens": 5}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 100_000}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "", "max_tokens": 5}, 400, "prompt"),
    ({"prompt": [], "max_tokens": 5}, 400, "prompt"),
    ({"prompt": [1, 99999], "max_tokens": 5}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-17"}, 404, "model"),
    ({"prompt": "x" * 70_000}, 413, None),  # over the test server's 64 KiB body limit
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[f"{i}-{s}" for i, (_, s, _) in enumerate(BAD)])
def test_bad_input_is_a_4xx_error_object_and_the_server_goes_on(live, body, status, param):
    r = post(live, "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param
    ok = post(live, "/v1/completions", {"prompt": "def ", "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_chat_bad_input_and_a_model_without_template(live, model_tok, run_dir):
    assert post(live, "/v1/chat/completions", {"messages": []}).json()["error"]["param"] == "messages"
    r = post(live, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    plain = LiveServer(make_loader(model_tok, run_dir))
    try:
        plain.wait_ready()
        r = post(plain, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
        assert post(plain, "/v1/completions", {"prompt": "def ", "max_tokens": 2}).status_code == 200
    finally:
        plain.stop()


def test_a_model_error_fails_that_request_only(live):
    c = client(live)
    other = {}
    t = threading.Thread(target=lambda: other.update(r=post(live, "/v1/completions", {
        "prompt": "def ", "max_tokens": 150, "temperature": 0, "ignore_eos": True})))
    t.start()
    time.sleep(0.05)
    for stream in (False, True):
        r = post(live, "/v1/completions", {"prompt": [1, POISON, 2], "max_tokens": 5, "stream": stream})
        assert r.status_code == 500 and "poisoned" in r.json()["error"]["message"]
    t.join(60)
    assert other["r"].status_code == 200 and other["r"].json()["usage"]["completion_tokens"] == 150
    assert httpx.get(f"{live.url}/health").status_code == 200
    assert c.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"ignore_eos": True}
                                ).usage.completion_tokens == 2
    assert metric_values(live)[("moekit:request_failure_total", ())] >= 2


def test_a_client_disconnecting_mid_stream_frees_its_slot(model_tok, chat_dir):
    srv = LiveServer(make_loader(model_tok, chat_dir, max_batch=1))
    try:
        srv.wait_ready()
        engine = srv.state.loaded.engine
        with httpx.stream("POST", f"{srv.url}/v1/completions", timeout=30, json={
                "prompt": "def ", "max_tokens": 900, "temperature": 0, "stream": True, "ignore_eos": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert engine.num_running == 1
        deadline = time.monotonic() + 1  # 900 tokens take several seconds
        while engine.num_running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.num_running == 0
        assert metric_values(srv)[("moekit:generation_tokens_total", ())] < 300  # freed long before 900
        t0 = time.monotonic()
        r = post(srv, "/v1/completions", {"prompt": "x", "max_tokens": 3})  # the only slot is free again
        assert r.status_code == 200 and time.monotonic() - t0 < 5
        assert metric_values(srv)[("moekit:request_success_total", (("finished_reason", "abort"),))] == 1
    finally:
        srv.stop()


def test_api_key(model_tok, chat_dir):
    srv = LiveServer(make_loader(model_tok, chat_dir), api_key="sekrit")
    try:
        srv.wait_ready()
        body = {"prompt": "def ", "max_tokens": 2}
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "sekrit"}):
            r = post(srv, "/v1/completions", body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{srv.url}/v1/models").status_code == 401
        assert post(srv, "/v1/completions", body, headers={"authorization": "Bearer sekrit"}).status_code == 200
        assert client(srv, api_key="sekrit").completions.create(model="tiny", prompt="x", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            client(srv, api_key="nope").completions.create(model="tiny", prompt="x", max_tokens=2)
        assert httpx.get(f"{srv.url}/health").status_code == 200
    finally:
        srv.stop()


def test_health_is_503_while_loading(model_tok, chat_dir):
    gate = threading.Event()
    load = make_loader(model_tok, chat_dir)
    srv = LiveServer(lambda metrics: gate.wait(20) and load(metrics))
    try:
        assert httpx.get(f"{srv.url}/health").status_code == 503
        r = post(srv, "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        gate.set()
        srv.wait_ready()
        assert httpx.get(f"{srv.url}/health").status_code == 200
    finally:
        gate.set()
        srv.stop()


def test_metrics_move_and_match_the_expert_stats(live, model_tok):
    model, tok = model_tok
    before = metric_values(live)
    ids = encode(tok, "def parse_")
    post(live, "/v1/completions", {"prompt": "def parse_", "max_tokens": 10, "temperature": 0, "ignore_eos": True})
    after = metric_values(live)

    def moved(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert moved("moekit:prompt_tokens_total") == len(ids)
    assert moved("moekit:generation_tokens_total") == 10
    assert moved("moekit:time_to_first_token_seconds_count") == 1
    assert moved("moekit:inter_token_latency_seconds_count") == 9
    assert moved("moekit:e2e_request_latency_seconds_count") == 1
    assert moved("moekit:request_success_total", (("finished_reason", "length"),)) == 1
    assert after[("moekit:num_requests_running", ())] == 0
    # every token fed to the model (the prompt and all but the last new token) is routed to top_k experts
    fed, k = len(ids) + 10 - 1, model.config.moe.top_k
    stats = httpx.get(f"{live.url}/v1/experts/stats").json()
    for layer in range(model.config.n_layers):
        tokens = [after[("moekit:expert_tokens_total", (("expert", str(e)), ("layer", str(layer))))]
                  for e in range(model.config.moe.num_experts)]
        assert sum(tokens) - sum(before.get(("moekit:expert_tokens_total", (("expert", str(e)), ("layer", str(layer)))), 0)
                                 for e in range(model.config.moe.num_experts)) == fed * k
        s = stats["layers"][str(layer)]
        assert s["tokens_per_expert"] == tokens
        w = s["window_tokens_per_expert"]
        assert s["max_over_mean"] == pytest.approx(max(w) / (sum(w) / len(w)))
        assert after[("moekit:expert_load_max_over_mean", (("layer", str(layer)),))] == pytest.approx(
            s["max_over_mean"])
        assert s["dead_fraction"] == sum(x == 0 for x in w) / len(w)
