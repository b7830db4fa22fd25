"""Prometheus metrics of the server (prefix ``moekit:``) and the expert-load window behind them.

Request metrics are counters and histograms observed as tokens come out. The MoE metrics are read at
scrape time from :class:`ExpertLoad`, which the engine feeds a (L, E) array of tokens per expert per
forward: the lifetime totals, and over the last ``window`` forwards each layer's max/mean load and its
fraction of dead experts (experts that got no token in the window). The counts come from the routers'
outputs (``router_tap``), not from ``MoEStats``, whose lazy computation would cost a quarter of a step.
When the routed experts are offloaded, the expert cache's hits, misses, bytes read and stall time per
layer are read at scrape time too.
"""
from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["ExpertLoad", "RequestObserver", "ServeMetrics"]

# Latency buckets (seconds): decode steps of a small CPU model are milliseconds, a long request seconds.
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                  0.5, 0.75, 1.0, 2.5, 5.0)
_REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)


class ExpertLoad:
    """Tokens per expert per MoE layer: lifetime totals and a window of the last ``window`` forwards."""

    def __init__(self, layers: list[int], num_experts: int, window: int = 256):
        self.layers = list(layers)
        self.num_experts = num_experts
        self.window = window
        self.total_LE = np.zeros((len(layers), num_experts), dtype=np.int64)
        self._recent: deque[np.ndarray] = deque()
        self._recent_LE = np.zeros_like(self.total_LE)
        self.forwards = 0
        self._lock = threading.Lock()

    def add(self, counts_LE: np.ndarray) -> None:
        with self._lock:
            self.total_LE += counts_LE
            self._recent.append(counts_LE)
            self._recent_LE += counts_LE
            if len(self._recent) > self.window:
                self._recent_LE -= self._recent.popleft()
            self.forwards += 1

    def snapshot(self) -> dict:
        """Plain numbers, layer by layer (the JSON of ``GET /v1/experts/stats``)."""
        with self._lock:
            total, recent, n = self.total_LE.copy(), self._recent_LE.copy(), len(self._recent)
        layers = {}
        for i, layer in enumerate(self.layers):
            r = recent[i]
            mean = r.mean()
            layers[str(layer)] = {
                "tokens_per_expert": total[i].tolist(),
                "window_tokens_per_expert": r.tolist(),
                "max_over_mean": float(r.max() / mean) if mean > 0 else None,
                "dead_fraction": float((r == 0).mean()) if r.sum() > 0 else None,
            }
        return {"num_experts": self.num_experts, "window_forwards": n, "window": self.window,
                "forwards_read": self.forwards, "layers": layers}


class _ExpertCollector(Collector):
    def __init__(self, load: ExpertLoad):
        self.load = load

    def collect(self):
        snap = self.load.snapshot()
        tokens = CounterMetricFamily("moekit:expert_tokens", "tokens routed to each expert (assignments, in "
                                     "the forwards the engine read)", labels=["layer", "expert"])
        imb = GaugeMetricFamily("moekit:expert_load_max_over_mean", "max/mean tokens per expert over the "
                                "recent window (1 = balanced)", labels=["layer"])
        dead = GaugeMetricFamily("moekit:expert_dead_fraction", "fraction of experts with no token over the "
                                 "recent window", labels=["layer"])
        for layer, s in snap["layers"].items():
            for e, n in enumerate(s["tokens_per_expert"]):
                tokens.add_metric([layer, str(e)], n)
            if s["max_over_mean"] is not None:
                imb.add_metric([layer], s["max_over_mean"])
                dead.add_metric([layer], s["dead_fraction"])
        yield from (tokens, imb, dead)


class _QueueCollector(Collector):
    def __init__(self, depth):
        self.depth = depth  # () -> (running, waiting)

    def collect(self):
        running, waiting = self.depth()
        r = GaugeMetricFamily("moekit:num_requests_running", "requests in the running batch")
        r.add_metric([], running)
        w = GaugeMetricFamily("moekit:num_requests_waiting", "requests waiting for a batch slot")
        w.add_metric([], waiting)
        yield from (r, w)


class _CacheCollector(Collector):
    """The expert cache of an offloaded model, per layer, read at scrape time from its ``stats()``."""

    _COUNTERS = (("hits", "expert_cache_hits", "expert accesses served from the cache"),
                 ("misses", "expert_cache_misses", "expert accesses that waited for a read from disk"),
                 ("prefetch_hits", "expert_cache_prefetch_hits", "hits on experts the prefetcher loaded"),
                 ("bytes_read", "expert_cache_read_bytes", "bytes of expert weights read from disk"),
                 ("stall_s", "expert_cache_stall_seconds", "seconds the model waited for expert reads"))

    def __init__(self, stats):
        self.stats = stats  # () -> ExpertCache.stats()

    def collect(self):
        st = self.stats()
        for key, name, doc in self._COUNTERS:
            fam = CounterMetricFamily(f"moekit:{name}", doc, labels=["layer"])
            for layer, s in st["per_layer"].items():
                fam.add_metric([str(layer)], s[key])
            yield fam
        cap = GaugeMetricFamily("moekit:expert_cache_capacity_experts", "experts the cache budget holds")
        cap.add_metric([], st["capacity_experts"])
        yield cap


class ServeMetrics:
    """Every metric of one server in its own registry (tests start many servers in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        reg = self.registry
        self.prompt_tokens = Counter("moekit:prompt_tokens", "prompt tokens prefilled", registry=reg)
        self.generation_tokens = Counter("moekit:generation_tokens", "tokens generated", registry=reg)
        self.request_success = Counter("moekit:request_success", "requests finished, by reason",
                                       ["finished_reason"], registry=reg)
        self.request_failure = Counter("moekit:request_failure", "requests that failed inside the model",
                                       registry=reg)
        self.ttft = Histogram("moekit:time_to_first_token_seconds", "arrival to first token",
                              buckets=_REQUEST_BUCKETS, registry=reg)
        self.itl = Histogram("moekit:inter_token_latency_seconds", "time between two tokens of a request",
                             buckets=_TOKEN_BUCKETS, registry=reg)
        self.e2e = Histogram("moekit:e2e_request_latency_seconds", "arrival to last token",
                             buckets=_REQUEST_BUCKETS, registry=reg)

    def observer(self, sink, n_prompt: int) -> RequestObserver:
        """``sink`` wrapped so that the request's events are observed on their way to it."""
        return RequestObserver(self, n_prompt, sink)

    def watch_queue(self, depth) -> None:
        self.registry.register(_QueueCollector(depth))

    def watch_experts(self, load: ExpertLoad) -> None:
        self.registry.register(_ExpertCollector(load))

    def watch_cache(self, stats) -> None:
        """Report an offloaded model's expert cache (``stats``: its ``OffloadedModel.stats``)."""
        self.registry.register(_CacheCollector(stats))


class RequestObserver:
    """One request's metrics, observed from its events (``kind`` "token" / "finish" / "error") as they reach
    its sink: time to first token from the observer's creation (the request's submission), then the time
    between tokens, the tokens, and how the request ended. Whichever process decodes, the numbers are
    taken where the request's client is served."""

    __slots__ = ("last", "metrics", "n_prompt", "sink", "start")

    def __init__(self, metrics: ServeMetrics, n_prompt: int, sink):
        self.metrics, self.n_prompt, self.sink = metrics, n_prompt, sink
        self.start, self.last = time.perf_counter(), None

    def __call__(self, ev) -> None:
        now, m = time.perf_counter(), self.metrics
        if ev.kind == "token":
            if self.last is None:
                m.ttft.observe(now - self.start)
                m.prompt_tokens.inc(self.n_prompt)
            else:
                m.itl.observe(now - self.last)
            self.last = now
            m.generation_tokens.inc()
        elif ev.kind == "finish":
            m.request_success.labels(ev.finish_reason).inc()
            m.e2e.observe(now - self.start)
        elif ev.kind == "error":
            m.request_failure.inc()
        self.sink(ev)
