"""`moekit bench serve`: what serving costs -- throughput and latency of `moekit serve` under load.

A fixed-seed workload (prompts cut from the Python stdlib sources, so routing sees real text; every
request runs to exactly ``output_len`` tokens with ``ignore_eos``) is sent at each concurrency level as
streamed completions. Per level: request throughput, output tokens/s, mean/median/p90/p99 of time to
first token (TTFT), time per output token (TPOT = (e2e - TTFT) / (tokens - 1)), inter-token latency
(ITL, between streamed chunks) and end-to-end latency; the server's peak RssAnon / RssFile (sampled
from /proc/PID/status); and, greedy, the fraction of token positions equal to concurrency 1's. A server
that offloads its routed experts (``--expert-memory``) also reports, per level, the expert cache's hit
rate and the disk bytes read per generated token (from ``GET /v1/experts/stats`` before and after).
"""
from __future__ import annotations

import asyncio
import json
import random
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["RequestResult", "ServerProcess", "cache_figures", "cache_totals", "make_workload", "run_level",
           "summarize"]


def make_workload(n: int, prompt_chars: int, seed: int) -> list[str]:
    """``n`` prompts of ``prompt_chars`` characters, cut at fixed-seed offsets from stdlib modules."""
    rng = random.Random(seed)
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.stat().st_size > 4 * prompt_chars)
    out = []
    while len(out) < n:
        text = rng.choice(files).read_text(errors="replace")
        start = rng.randrange(0, len(text) - prompt_chars)
        out.append(text[start:start + prompt_chars])
    return out


@dataclass
class RequestResult:
    start: float
    chunk_times: list[float] = field(default_factory=list)
    end: float = 0.0
    tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    error: str | None = None


async def _one(client, url: str, prompt: str, output_len: int, model: str | None) -> RequestResult:
    body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True}
    if model:
        body["model"] = model
    res = RequestResult(time.perf_counter())
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                msg = json.loads(line[6:])
                if msg.get("usage"):
                    res.tokens = msg["usage"]["completion_tokens"]
                for ch in msg.get("choices", []):
                    if ch.get("text") or ch.get("token_ids"):  # a token, even one whose text is held back
                        res.chunk_times.append(time.perf_counter())
                    res.token_ids += ch.get("token_ids") or []
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
    res.end = time.perf_counter()
    return res


async def _level(url: str, prompts: list[str], output_len: int, concurrency: int, model: str | None,
                 api_key: str | None) -> tuple[list[RequestResult], float]:
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits, headers=headers) as client:
        async def bounded(p):
            async with sem:
                return await _one(client, url, p, output_len, model)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        return list(results), time.perf_counter() - t0


def run_level(url: str, prompts: list[str], output_len: int, concurrency: int, model: str | None = None,
              api_key: str | None = None) -> tuple[list[RequestResult], float]:
    return asyncio.run(_level(url, prompts, output_len, concurrency, model, api_key))


def _dist(xs: list[float]) -> dict:
    if not xs:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    s = sorted(xs)

    def q(f):
        return s[min(len(s) - 1, round(f * (len(s) - 1)))]

    return {"mean": statistics.fmean(s), "median": statistics.median(s), "p90": q(0.90), "p99": q(0.99)}


def summarize(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    ttft = [r.chunk_times[0] - r.start for r in ok if r.chunk_times]
    tpot = [(r.end - r.chunk_times[0]) / (r.tokens - 1) for r in ok if r.chunk_times and r.tokens > 1]
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    e2e = [r.end - r.start for r in ok]
    out_tokens = sum(r.tokens for r in ok)
    return {"requests": len(results), "failed": len(results) - len(ok), "wall_s": wall,
            "request_throughput": len(ok) / wall, "output_tokens_per_s": out_tokens / wall,
            "output_tokens": out_tokens, "ttft_s": _dist(ttft), "tpot_s": _dist(tpot), "itl_s": _dist(itl),
            "e2e_s": _dist(e2e), "errors": sorted({r.error for r in results if r.error})[:3]}


def agreement(a: list[RequestResult], b: list[RequestResult]) -> float | None:
    """Fraction of token positions where two runs of the same greedy workload agree."""
    same = total = 0
    for x, y in zip(a, b):
        n = max(len(x.token_ids), len(y.token_ids))
        total += n
        same += sum(i == j for i, j in zip(x.token_ids, y.token_ids))
    return same / total if total else None


def cache_totals(url: str, api_key: str | None = None) -> dict | None:
    """The expert cache's running totals (accesses, hits, bytes_read, ...) of a server that offloads its
    routed experts, from ``GET /v1/experts/stats``; None when it does not offload."""
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    body = httpx.get(f"{url}/v1/experts/stats", timeout=10, headers=headers).json()
    return body.get("cache")


def cache_figures(before: dict, after: dict, output_tokens: int) -> dict:
    """Hit rate and disk bytes per generated token between two :func:`cache_totals` readings."""
    acc, hits = after["accesses"] - before["accesses"], after["hits"] - before["hits"]
    read = after["bytes_read"] - before["bytes_read"]
    return {"expert_hit_rate": hits / acc if acc else None, "expert_accesses": acc,
            "expert_bytes_read": read, "expert_bytes_read_per_token": read / output_tokens if output_tokens else None,
            "expert_stall_s": after["stall_s"] - before["stall_s"]}


class ServerProcess:
    """``moekit serve DIR`` on 127.0.0.1 and a free port, in a child process; samples its memory."""

    def __init__(self, model_dir: str, args: list[str], port: int | None = None):
        import socket

        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moekit", "serve", model_dir, "--port", str(port), *args],
                                     stderr=subprocess.PIPE, text=True)
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moekit serve exited with {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the server did not become ready")

    def _sample(self) -> None:
        while not self._stop.is_set():
            for k, v in read_rss(self.proc.pid).items():
                self.peak[k] = max(self.peak[k], v)
            self._stop.wait(0.05)

    def metrics_text(self) -> str:
        import httpx

        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def stop(self) -> int:
        self._stop.set()
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.proc.stderr.close()


def read_rss(pid: int) -> dict[str, int]:
    """RssAnon / RssFile / VmRSS in bytes of a process and its descendants (the server and its engine
    process), summed (Linux /proc/PID/status); {} if unreadable."""
    out: dict[str, int] = {}
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmRSS"):
                    out[key] = out.get(key, 0) + int(rest.split()[0]) * 1024
        except OSError:
            pass
    return out


def _tree(pid: int) -> list[int]:
    """``pid`` and every descendant (Linux /proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def metrics_work_per_step(n_layers: int, num_experts: int, top_k: int, batch: int, reps: int = 2000,
                          compiled: bool = False) -> float:
    """Seconds of metrics work one decode step of ``batch`` requests adds in the engine: counting the
    routers' picks into the expert window and one TTFT/ITL observation and token count per request. Eagerly
    the counting is ``RouterTap.take``'s bincounts + ``ExpertLoad.add``; a compiled step returns its (E,)
    counts per layer from the graph (a scatter over B x K picks inside the step, left in the step's time),
    so there only their stacking to the host and ``ExpertLoad.add`` are host work. Timed in isolation: an
    end-to-end A/B on a shared machine cannot resolve 2%."""
    import torch

    from moekit.serve.compiled_steps import counts_to_host
    from moekit.serve.metrics import ExpertLoad, ServeMetrics

    picks = {i: torch.randint(0, num_experts, (batch, top_k)) for i in range(n_layers)}
    graph_counts = {i: torch.bincount(p.reshape(-1), minlength=num_experts) for i, p in picks.items()}
    layers = list(range(n_layers))
    load, m = ExpertLoad(layers, num_experts), ServeMetrics()

    def counts_LE():
        if compiled:
            return counts_to_host(graph_counts, layers)
        return torch.stack([torch.bincount(picks[i].reshape(-1), minlength=num_experts)[:num_experts]
                            for i in layers]).numpy()

    def step():
        load.add(counts_LE())
        for _ in range(batch):
            m.itl.observe(0.01)
            m.generation_tokens.inc()

    step()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - t0) / reps
