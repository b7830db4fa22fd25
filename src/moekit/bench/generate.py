"""`moekit bench generate RUN_DIR [--expert-memory SIZE] [--expert-cache lru|lfu] [--no-prefetch]
[--batch 1,8] [--json PATH]`: decode speed, latency, memory and expert-cache figures of a model, resident or
offloaded.

Per batch size, in one process: 1. load (resident: ``moekit.hf.load_any``; with ``--expert-memory``:
``moekit.infer.offload.load_offloaded``), RSS sampled every 5 ms from here on; 2. the disk's cold sequential
``pread`` bandwidth over the checkpoint; 3. greedy decoding of random prompts with the KV cache, each step
timed; 4. RAM sequential-read bandwidth (a 512 MiB tensor sum, after the run so it is not in the peak RSS);
5. the expert trace replayed through Belady's MIN and through the live policy.

``bandwidth_utilization`` = bytes of weights a decode step touches (every non-expert weight but the
embedding rows not looked up, plus each distinct routed expert of each layer) x steps/s / RAM bandwidth.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from moekit.infer.offload_flags import add_offload_args

__all__ = ["add_parser", "bench_generate", "run"]


def add_parser(sub: Any) -> None:
    g = sub.add_parser("generate", help="decode speed, latency, memory and expert-cache hit rates of a model")
    g.add_argument("run_dir", metavar="RUN_DIR", help="a moekit run directory or an HF model directory")
    add_offload_args(g, none_means="all resident")
    g.add_argument("--batch", default="1", metavar="LIST",
                   help="batch sizes, comma-separated, each measured in turn (default 1)")
    g.add_argument("--prompt-len", type=int, default=32, metavar="N",
                   help="tokens of each random prompt (default 32)")
    g.add_argument("--new-tokens", type=int, default=64, metavar="N",
                   help="tokens decoded greedily per sequence (default 64)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], metavar="NAME",
                   help="cast the weights; one of: float32, bfloat16 (default none: the checkpoint's)")
    g.add_argument("--threads", type=int, default=2, metavar="N", help="intra-op CPU threads (default 2)")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the random prompts (default 0)")
    g.add_argument("--trace", default=None, metavar="PATH",
                   help="with --expert-memory: write the expert trace (JSON) here, PATH.bN per batch size N "
                        "when several (default none)")
    g.add_argument("--prefetch-oracle", default=None, metavar="PATH",
                   help="with --expert-memory: prefetch from a --trace of the same run, a perfect "
                        "prediction: what prefetch hides at best (default none: predict from the routers)")
    g.add_argument("--compile", action="store_true",
                   help="resident only: decode through the compiled step (moekit.infer.CompiledDecoder); the "
                        "compile time is reported as compile_s, outside the timings (default off: eager)")
    g.add_argument("--json", metavar="PATH",
                   help="write the figures of every batch size here as JSON (default none)")

def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _touched_bytes(model: Any, counts: dict[int, Any], B: int, expert_bytes: int, non_expert: int) -> int:
    """counts: MoE layer -> (E,) assignments each expert computed this step."""
    emb = model.embed.weight
    rows = 0 if model.lm_head is None else emb.numel() * emb.element_size() - B * emb.shape[1] * emb.element_size()
    experts = sum(int((c > 0).sum()) for c in counts.values())
    return non_expert - rows + experts * expert_bytes


@dataclass
class _Loaded:
    """The model under test (``om``: its offloaded wrapper, None when resident), its weight sizes, load time."""

    model: Any
    om: Any
    non_expert: int
    expert_bytes: int
    load_s: float


@dataclass
class _Timings:
    """What the decoding run measured; ``read0``, ``st0``: the store's bytes and the cache's stats before it."""

    ttft: float
    itl: list[float]
    touched: list[int]
    disk_bw: float | None
    read0: int
    read_prefill: int
    st0: dict[str, Any] | None


def bench_generate(path: str, batch: int = 1, expert_memory: str | None = None, policy: str = "lru",
                   prefetch: bool = True, read: str = "pread", prompt_len: int = 32, new_tokens: int = 64,
                   dtype: str | None = None, seed: int = 0, trace: str | None = None, oracle: str | None = None,
                   compile: bool = False) -> dict[str, Any]:
    """The figures of one batch size (see the module docstring)."""
    from moekit.infer.memory import PeakRSS, page_cache_bytes, rss

    # 1. memory before loading; 2. load and decode, RSS sampled throughout; 3. the figures of every model;
    # 4. an offloaded model's cache figures, then its trace saved and its store closed
    base = rss()
    cache0 = page_cache_bytes()
    with PeakRSS() as peak, torch.inference_mode():
        m = _load(path, expert_memory, policy, prefetch, read, dtype, oracle)
        decoder, compile_s = _compiled(m, batch, prompt_len + new_tokens) if compile else (None, 0.0)
        tm = _measure(m, peak, batch, prompt_len, new_tokens, seed, decoder)
    res = _figures(m, tm, peak, base, cache0, batch, prompt_len, new_tokens)
    res |= {"compiled": compile, "compile_s": compile_s}
    if m.om is None:
        res |= {"expert_hit_rate": 1.0, "optimal_hit_rate": 1.0, "expert_bytes_read_per_token": 0}
        return res
    res |= _offload_figures(m.om, tm, batch, expert_memory, policy, prefetch, read, oracle)
    if trace:
        m.om.save_trace(trace)
    m.om.close()
    return res


def _compiled(m: _Loaded, batch: int, total: int) -> tuple[Any, float]:
    """A compiled decoder for the resident model, its graph compiled for this batch and length."""
    from moekit.infer.compiled import CompiledDecoder

    if m.om is not None:
        raise ValueError("--compile measures the resident model: drop --expert-memory, or --compile")
    decoder = CompiledDecoder(m.model)
    return decoder, decoder.warm_up(batch, total)


def _load(path: str, expert_memory: str | None, policy: str, prefetch: bool, read: str, dtype: str | None,
          oracle: str | None) -> _Loaded:
    """Resident (``moekit.hf.load_any``) without ``expert_memory``, else offloaded; timed."""
    t_load = time.perf_counter()
    if expert_memory is None:
        model, non_expert, expert_bytes = _load_resident(path, dtype)
        om = None
    else:
        om = _load_offloaded(path, expert_memory, policy, prefetch, read, dtype, oracle)
        model, non_expert, expert_bytes = om.model, om.non_expert_bytes, om.cache.expert_bytes
    return _Loaded(model, om, non_expert, expert_bytes, time.perf_counter() - t_load)


def _expert_format(model: Any) -> str:
    """How the routed experts are held: a quantized run's format, else the weights' dtype."""
    spec = getattr(model, "quant_spec", None)
    if spec is not None:
        return spec.fmt + (f"-g{spec.group}" if spec.group else "")
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(model.embed.weight.dtype, str(model.embed.weight.dtype))


def _load_resident(path: str, dtype: str | None) -> tuple[Any, int, int]:
    """The model, the bytes of its non-expert weights, and the bytes of one expert."""
    from moekit.hf import load_any
    from moekit.infer.load import non_expert_bytes

    model, _ = load_any(path, dtype)
    non_expert = non_expert_bytes(model)
    moe = model.moe_layers()
    if not moe:  # a dense model (the MoE's twin): nothing routed, every weight read each token
        return model, non_expert, 0
    m0 = moe[0].experts
    # every tensor of the experts module is (E, ...): float weights, or a quantized run's q / scale / base
    expert_bytes = sum(t.numel() * t.element_size() for t in (*m0.parameters(), *m0.buffers())) // m0.num_experts
    return model, non_expert, expert_bytes


def _load_offloaded(path: str, expert_memory: str, policy: str, prefetch: bool, read: str, dtype: str | None,
                    oracle: str | None) -> Any:
    """``moekit.infer.offload.load_offloaded``, prefetching from the ``oracle`` trace when one is given."""
    from moekit.infer.offload import load_offloaded

    predictor = None
    if oracle:
        from moekit.infer.cache import Trace
        from moekit.infer.prefetch import oracle_predictor

        predictor = oracle_predictor(Trace.load(oracle))
    return load_offloaded(path, expert_memory, policy=policy, prefetch=prefetch, read=read, dtype=dtype,
                          predictor=predictor)


def _measure(m: _Loaded, peak: Any, batch: int, prompt_len: int, new_tokens: int, seed: int,
             decoder: Any = None) -> _Timings:
    """Greedy decoding of random prompts with the KV cache, each step timed (after the disk's bandwidth);
    with a ``decoder`` (:class:`moekit.infer.CompiledDecoder`, compiled beforehand) through its steps."""
    from moekit.infer.memory import sequential_read_gbps
    from moekit.infer.load import ready_to_decode

    model, om = m.model, m.om
    V, gen = model.config.vocab_size, torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(V, 512), (batch, prompt_len), generator=gen)
    if om is None:  # fault every memory-mapped weight in before timing (not only the routed experts')
        for t in model.state_dict().values():
            t.sum() if t.is_floating_point() else None
        model(ids[:, :4])
    ready_to_decode(model, torch.get_num_threads())  # the single-row kernels' compile stays out of the timings
    disk_bw = sequential_read_gbps(om.cache.store.files()) if om is not None else None
    read0 = om.cache.store.bytes_read if om is not None else 0
    # 1. prefill -> first token
    kv = model.new_kv_cache()  # as generate() decodes: capacity-doubling buffers, windows trimmed
    t0 = time.perf_counter()
    logits = model(ids, kv_cache=kv, logits_to_keep=1).logits[:, -1]
    nxt = logits.argmax(-1)
    ttft = time.perf_counter() - t0
    read_prefill = (om.cache.store.bytes_read if om is not None else 0) - read0
    st0 = om.stats() if om is not None else None
    state = decoder.start(kv, None, prompt_len + new_tokens) if decoder is not None else None
    itl, touched = [], []
    for _ in range(new_tokens - 1):  # 2. decode steps
        t1 = time.perf_counter()
        if state is not None:
            logits, counts = decoder.step(nxt.unsqueeze(1), state)
        else:
            out = model(nxt.unsqueeze(1), kv_cache=kv)
            logits, counts = out.logits[:, -1], None
        nxt = logits.argmax(-1)
        itl.append(time.perf_counter() - t1)
        counts = counts if counts is not None else {i: s.tokens_per_expert for i, s in out.stats.items()}
        touched.append(_touched_bytes(model, counts, batch, m.expert_bytes, m.non_expert))
        peak.sample()
    return _Timings(ttft, itl, touched, disk_bw, read0, read_prefill, st0)


def _figures(m: _Loaded, tm: _Timings, peak: Any, base: dict[str, int], cache0: int, batch: int,
             prompt_len: int, new_tokens: int) -> dict[str, Any]:
    """Speed, latency, memory and bandwidth figures, resident or offloaded."""
    from moekit.infer.memory import memory_bandwidth_gbps, page_cache_bytes, rss

    itl, touched = tm.itl, tm.touched
    decode_s = sum(itl)
    steps = len(itl)
    # after the run: the allocator keeps freed memory (moekit.runtime), which would count as peak RSS
    mem_bw = memory_bandwidth_gbps(512 << 20)
    res: dict[str, Any] = {
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "load_s": m.load_s,
        "tokens_per_s": batch * steps / max(decode_s, 1e-9), "ttft_s": tm.ttft,
        "itl_s": {"median": statistics.median(itl) if itl else 0.0, "p90": _pct(itl, 0.9), "p99": _pct(itl, 0.99)},
        "peak_rss_anon_bytes": peak.peak_anon, "peak_rss_file_bytes": peak.peak_file,
        "rss_anon_before_load_bytes": base["anon"], "page_cache_growth_bytes": page_cache_bytes() - cache0,
        # the resident (non-expert) weights are memory-mapped, so part of the growth is theirs
        "rss_file_end_bytes": rss()["file"],
        "non_expert_bytes": m.non_expert, "expert_bytes": m.expert_bytes, "expert_format": _expert_format(m.model),
        "weights_touched_per_step_bytes": statistics.mean(touched) if touched else 0,
        "bandwidth_gbps_measured": mem_bw, "disk_bandwidth_gbps_measured": tm.disk_bw,
    }
    res["bandwidth_utilization"] = res["weights_touched_per_step_bytes"] * steps / max(decode_s, 1e-9) / 1e9 / mem_bw
    return res


def _offload_figures(om: Any, tm: _Timings, batch: int, expert_memory: str, policy: str, prefetch: bool,
                     read: str, oracle: str | None) -> dict[str, Any]:
    """The expert cache's figures: live hit rates beside the replayed trace's, bytes read, stalls."""
    from moekit.infer.cache import replay
    from moekit.infer.memory import cached_bytes
    from moekit.infer.store import expert_ranges

    st, st0 = om.stats(), tm.st0
    tokens = max(batch * len(tm.itl), 1)
    decode_read = om.cache.store.bytes_read - tm.read0 - tm.read_prefill
    res = {
        "expert_memory": expert_memory, "expert_cache": policy, "prefetch": prefetch, "read": read,
        "cache_capacity_experts": st["capacity_experts"], "expert_hit_rate": st["hit_rate"],
        "optimal_hit_rate": replay(om.cache.trace, "min")["hit_rate"],
        "replayed_hit_rate": replay(om.cache.trace, policy)["hit_rate"],
        # beside MIN (the demand-only optimum): the live policy on the demand-only sequence, and the live
        # hits that were not prefetched
        "policy_demand_only_hit_rate": replay(om.cache.trace, policy, prefetch=False)["hit_rate"],
        "hit_rate_excluding_prefetch_hits": (st["hits"] - st["prefetch_hits"]) / max(st["accesses"], 1),
        "expert_bytes_read_per_token": decode_read / tokens,
        "expert_bytes_read_prefill": tm.read_prefill, "miss_stall_s": st["stall_s"],
        "prefetch_recall": st["prefetch_recall"], "prefetch_precision": st["prefetch_precision"],
        "prefetch_hits": st["prefetch_hits"], "misses": st["misses"], "accesses": st["accesses"],
        "prefetch_oracle": bool(oracle),
        "decode_miss_stall_s_per_token": (st["stall_s"] - st0["stall_s"]) / tokens,
        "decode_misses_per_token": (st["misses"] - st0["misses"]) / tokens,
        "decode_prefetch_hits_per_token": (st["prefetch_hits"] - st0["prefetch_hits"]) / tokens,
    }
    # the experts' pages left in the page cache after the run (the store dropped them before the prefill)
    res["expert_page_cache_bytes"] = cached_bytes(expert_ranges(om.cache.store))
    return res


def run(args: argparse.Namespace) -> int:
    from moekit.runtime import configure

    configure(args.threads)
    results = []
    batches = [int(b) for b in str(args.batch).split(",") if b]
    for b in batches:
        print(f"bench generate {args.run_dir}: batch {b}, expert memory {args.expert_memory or 'resident'} ...",
              file=sys.stderr, flush=True)
        tr = args.trace if (args.trace is None or len(batches) == 1) else f"{args.trace}.b{b}"
        try:
            r = bench_generate(args.run_dir, b, args.expert_memory, args.expert_cache, args.prefetch, args.read,
                               args.prompt_len, args.new_tokens, args.dtype, args.seed, tr, args.prefetch_oracle,
                               args.compile)
        except (ValueError, FileNotFoundError) as e:
            print(f"moekit bench generate: error: {e}", file=sys.stderr)
            return 1
        results.append(r)
        print(f"batch {b} ({r['expert_format']} experts, {r['expert_bytes']:,} bytes each): "
              f"{r['tokens_per_s']:.2f} tok/s, ttft {r['ttft_s']:.3f}s, itl median "
              f"{r['itl_s']['median'] * 1e3:.1f} ms p99 {r['itl_s']['p99'] * 1e3:.1f} ms, peak anon "
              f"{r['peak_rss_anon_bytes'] / 2**20:.0f} MiB file {r['peak_rss_file_bytes'] / 2**20:.0f} MiB, hit "
              f"{r['expert_hit_rate']:.3f} (MIN {r['optimal_hit_rate']:.3f}), expert bytes/token "
              f"{r['expert_bytes_read_per_token'] / 2**20:.1f} MiB, bandwidth utilisation "
              f"{r['bandwidth_utilization']:.2f} of {r['bandwidth_gbps_measured']:.1f} GB/s"
              + (f", compiled in {r['compile_s']:.1f}s" if r["compiled"] else ""))
    if args.json:
        from moekit.rundir import atomic_write_json

        meta = {"torch": torch.__version__, "threads": args.threads, "machine": platform.machine(),
                "python": platform.python_version(), "run_dir": args.run_dir}
        atomic_write_json(args.json, {**results[0], "meta": meta, "results": results})
    return 0
