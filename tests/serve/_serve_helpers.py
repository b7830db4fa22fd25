"""Helpers of the serve tests: a tiny trained run, an in-process server on a free port, a poisoned model."""
from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import socket
import threading
import time
from pathlib import Path

import torch
import uvicorn

from moekit.serve.app import Loaded, ServeState, build_app
from moekit.serve.metrics import ServeMetrics

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
POISON = 7  # a prompt holding this token id makes the model raise (see Poisoned)
TINY = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--experts", "4", "--top-k", "2", "--router", "topk",
        "--expert-hidden", "64", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4", "--eval-interval", "30",
        "--eval-batches", "2", "--ckpt-interval", "1000", "--threads", "1", "--lr", "1e-2", "--warmup-steps", "5"]


def python_like_text(n_funcs: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    names, funcs = ["x", "y", "value", "items", "total", "key", "data"], ["parse", "load", "update", "merge"]
    out = []
    for _ in range(n_funcs):
        f, a, b = rng.choice(funcs), rng.choice(names), rng.choice(names)
        out.append(f"def {f}_{a}({a}, {b}):\n    if {a} is None:\n        return {b}\n"
                   f"    for {b} in range({rng.randint(2, 9)}):\n        {a} = {a} + {b}\n    return {a}\n")
    return "\n".join(out)


def train_tiny_run(root: Path) -> Path:
    """An 80-step tiny MoE run (2 layers, 4 experts, top-2, vocab 300, context 1024): ~6 s on one thread.
    After 30 steps greedy decoding still repeats one token, which would make identity checks weak."""
    from moekit.cli.train import main as train_main

    corpus = root / "code.txt"
    corpus.write_text(python_like_text(150))
    run = root / "run"
    with contextlib.redirect_stderr(io.StringIO()):
        assert train_main(["--data", str(corpus), "--out", str(run), *TINY, "--steps", "80"]) == 0
    return run


def with_chat_template(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    (dst / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return dst


class Poisoned(torch.nn.Module):
    """The model, except that a forward whose input holds token id POISON raises (a model failure)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def new_kv_cache(self):
        return self.inner.new_kv_cache()

    def forward(self, input_ids, **kw):
        if bool((input_ids == POISON).any()):
            raise RuntimeError("poisoned input")
        return self.inner(input_ids, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """build_app on uvicorn in a thread, on 127.0.0.1 and a free port; ``stop()`` shuts it down."""

    def __init__(self, load, *, name: str = "tiny", api_key: str | None = None, max_body_bytes: int = 1 << 16):
        self.metrics = ServeMetrics()
        self.state = ServeState(name, self.metrics, api_key, max_body_bytes)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = build_app(self.state, lambda: load(self.metrics))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def wait_ready(self, timeout: float = 20) -> Loaded:
        assert self.state.ready.wait(timeout), "model did not load"
        assert self.state.loaded is not None, self.state.load_error
        return self.state.loaded

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def start_stream(url: str, max_tokens: int, timeout: float = 60) -> tuple[list[str], threading.Event, threading.Thread]:
    """A greedy streamed completion on a thread: (the SSE data payloads as they arrive, set at the first one,
    the thread)."""
    import httpx

    events, started = [], threading.Event()

    def stream():
        with httpx.stream("POST", f"{url}/v1/completions", timeout=timeout, json={
                "prompt": "def ", "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()

    t = threading.Thread(target=stream)
    t.start()
    return events, started, t
