"""`moekit serve DIR` as a process: binds 127.0.0.1, serves, and on SIGTERM lets an in-flight stream
finish, refuses new connections, and exits 0."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import torch
from _serve_helpers import free_port, start_stream

from moekit.serve.cli import build_parser


def _wait_healthy(proc, url: str, timeout: float) -> None:
    """Until /health answers 200; the server's stderr if it exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def test_defaults_bind_localhost():
    args = build_parser().parse_args(["some/dir"])
    assert (args.host, args.port, args.api_key, args.deterministic) == ("127.0.0.1", 8000, None, False)


def test_serve_then_sigterm_finishes_in_flight_and_exits_0(run_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moekit", "serve", str(run_dir), "--port", str(port),
                             "--threads", "1", "--grace", "20"], stderr=subprocess.PIPE, text=True)
    try:
        _wait_healthy(proc, url, 30)
        events, started, t = start_stream(url, 150, timeout=30)
        assert started.wait(20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        t.join(10)
        assert events[-1] == "[DONE]"
        finals = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
        assert finals[-1] == "length"  # the in-flight request ran to its end within the grace period
        try:
            httpx.get(f"{url}/health", timeout=2)
            raise AssertionError("the server still accepts connections")
        except httpx.TransportError:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_serve_compile_answers_what_generate_gives(run_dir):
    """`moekit serve --compile` (engine in its own process): /health is 200 only once the step is compiled,
    and a greedy completion is generate()'s text; with --expert-memory the flag is refused at once."""
    from moekit.data import EOT, decode, encode
    from moekit.infer import generate, load_run

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moekit", "serve", str(run_dir), "--port", str(port),
                             "--threads", "1", "--compile", "--max-batch", "1"],  # one bucket's graph to compile
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_healthy(proc, url, 240)  # a cold compile on a fresh machine
        name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        body = {"model": name, "prompt": "def parse_", "max_tokens": 12, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        model, tok = load_run(run_dir)
        ids = encode(tok, "def parse_")
        eot = tok.token_to_id(EOT)
        out = generate(model, torch.tensor([ids]), 12, temperature=0, eos_id=eot)
        want = decode(tok, [t for t in out[0, len(ids):].tolist() if t != eot])
        assert r.json()["choices"][0]["text"] == want
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        err = proc.stderr.read()
        proc.stderr.close()
    assert "decode step compiled in" in err
    refused = subprocess.run([sys.executable, "-m", "moekit", "serve", str(run_dir), "--compile", "--expert-memory",
                              "all"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--compile decodes with every expert resident" in refused.stderr
