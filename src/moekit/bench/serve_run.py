"""The driver of `moekit bench serve`: servers, levels, the in-process baseline, tables and JSON."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from moekit.bench.serve import (
    ServerProcess,
    agreement,
    cache_figures,
    cache_totals,
    make_workload,
    metrics_work_per_step,
    run_level,
    summarize,
)
from moekit.infer.offload_flags import add_offload_args

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", nargs="?", metavar="RUN_DIR",
                   help="a moekit run directory or an HF model directory to serve (or give --url or "
                        "--compare)")
    p.add_argument("--url", help="also benchmark a server that is already running at URL, http://host:port "
                   "(default none)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="bearer token sent with every request, for a --url server that requires one "
                        "(default none)")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="serve two runs the same workload, one after the other (default none)")
    p.add_argument("--concurrency", default="1,2,4,8", metavar="LIST",
                   help="concurrency levels, comma-separated (default 1,2,4,8)")
    p.add_argument("--requests", type=int, default=16, metavar="N",
                   help="requests per level and round (default 16)")
    p.add_argument("--prompt-len", type=int, default=64, metavar="N",
                   help="prompt tokens; with --url ~4 characters each (default 64)")
    p.add_argument("--output-len", type=int, default=64, metavar="N",
                   help="tokens generated per request, end of document ignored (default 64)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the workload's prompts (default 0)")
    p.add_argument("--rounds", type=int, default=1, metavar="N",
                   help="run every level this many times, interleaved; a level's figures pool its rounds "
                        "(default 1)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="intra-op CPU threads of the servers started and of the baseline (default none: "
                        "what `moekit serve` chooses for the model, reported)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="requests decoded together by a started server (default 8)")
    p.add_argument("--deterministic", action="store_true",
                   help="start the servers with --deterministic (default off)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the servers started, repeatable (default none)")
    p.add_argument("--metrics-cost", type=int, default=0, metavar="ROUNDS",
                   help="also time ROUNDS alternating runs with metrics on / off (--no-metrics --stats-interval 0)"
                        " at the highest concurrency (default 0: not measured)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the in-process generate() baseline (default off)")
    p.add_argument("--json", metavar="PATH", help="write every figure here as JSON (default none)")
    add_offload_args(p, none_means="the servers started load every expert")


def _offload_args(args) -> list[str]:
    """The offloading flags, passed on to the servers started."""
    if args.expert_memory is None:
        return []
    return ["--expert-memory", str(args.expert_memory), "--expert-cache", args.expert_cache,
            "--prefetch" if args.prefetch else "--no-prefetch", "--read", args.read]

def _load_model(path: str, args):
    """The model as the server holds it (offloaded with the same cache when --expert-memory is given), its
    tokenizer, its figures, and what to close when done (None, or the OffloadedModel)."""
    import torch

    from moekit.infer.load import count_params, load_maybe_offloaded, ready_to_decode
    from moekit.infer.offload_flags import offload_kwargs

    model, tok, om = load_maybe_offloaded(path, offload_kwargs(args) if args.expert_memory is not None else None)
    ready_to_decode(model, args.threads)
    dtype = next(model.parameters()).dtype
    return model, tok, {"params": count_params(model), "dtype": str(dtype).replace("torch.", ""),
                        "threads": torch.get_num_threads()}, om


def _generate_per_token(model, prompts: list[list[int]], output_len: int, compile=False) -> float:
    """In-process generate() time per output token, prefill excluded: median over (up to 6) prompts.
    ``compile``: a ``CompiledDecoder`` (the baseline of a ``--compile`` server), warmed up untimed."""
    import torch

    from moekit.infer import generate

    if compile is not False:
        generate(model, torch.tensor([prompts[0]]), output_len, temperature=0, compile=compile)
    per_token = []
    for ids in prompts[:6]:
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        generate(model, x, 1, temperature=0, compile=compile)
        t1 = time.perf_counter()
        generate(model, x, output_len, temperature=0, compile=compile)
        t2 = time.perf_counter()
        per_token.append(((t2 - t1) - (t1 - t0)) / (output_len - 1))
    return sorted(per_token)[len(per_token) // 2]


def _token_prompts(tok, texts: list[str], n_tokens: int) -> list[list[int]]:
    from moekit.data import encode

    out = []
    for t in texts:
        ids = encode(tok, t)
        while len(ids) < n_tokens:
            ids = ids + ids
        out.append(ids[:n_tokens])
    return out


def _serve_args(args) -> list[str]:
    threads = ["--threads", str(args.threads)] if args.threads is not None else []  # else the server's choice
    out = threads + ["--max-batch", str(args.max_batch)]
    return out + (["--deterministic"] if args.deterministic else []) + _offload_args(args) + list(args.serve_arg)


def _compiled_server(args) -> bool:
    return "--compile" in args.serve_arg


def _baseline_decoder(model, args):
    """The in-process baseline decodes as the server does: compiled when the server compiles."""
    if model is None or not _compiled_server(args):
        return False
    from moekit.infer import CompiledDecoder

    return CompiledDecoder(model)


def _levels(url: str, prompts, args, levels: list[int], model=None) -> tuple[dict, list[float]]:
    """Every level, ``args.rounds`` times interleaved (a shared machine's load drifts between levels); a
    level's figures pool its rounds. With ``model``, generate()'s time per token is measured each round."""
    run_level(url, prompts[:2], min(8, args.output_len), 1, api_key=args.api_key)  # warm up
    pooled = {c: ([], 0.0) for c in levels}
    cache: dict[int, list[tuple[dict, dict]]] = {c: [] for c in levels}  # (before, after) per round
    baseline, paired = [], []
    decoder = _baseline_decoder(model, args)
    for r in range(args.rounds):
        if model is not None:
            baseline.append(_generate_per_token(model, prompts, args.output_len, decoder))
        for c in levels:
            print(f"  round {r + 1}/{args.rounds}, concurrency {c}: {len(prompts)} requests x {args.output_len} "
                  "tokens ...", file=sys.stderr, flush=True)
            before = cache_totals(url, args.api_key)
            res, wall = run_level(url, prompts, args.output_len, c, api_key=args.api_key)
            if c == 1 and baseline:  # paired with this round's generate(): the machine's drift cancels
                paired.append(summarize(res, wall)["itl_s"]["median"] / baseline[-1])
            if before is not None:
                cache[c].append((before, cache_totals(url, args.api_key)))
            pooled[c] = (pooled[c][0] + res, pooled[c][1] + wall)
    out, first = {}, pooled[levels[0]][0]
    for c in levels:
        s = summarize(*pooled[c])
        s["greedy_agreement_with_first_level"] = agreement(first, pooled[c][0])
        if cache[c]:  # the rounds' deltas summed
            keys = ("accesses", "hits", "bytes_read", "stall_s")
            b = {k: 0 for k in keys}
            a = {k: sum(x[k] - y[k] for y, x in cache[c]) for k in keys}
            s |= cache_figures(b, a, s["output_tokens"])
        if c == 1 and paired:
            s["itl_median_over_generate_rounds"] = paired
            s["itl_median_over_generate"] = sorted(paired)[len(paired) // 2]
        out[c] = s
    return out, baseline


def _metrics_cost(path: str, prompts, args, c: int) -> dict:
    on = ServerProcess(path, _serve_args(args))
    off = ServerProcess(path, _serve_args(args) + ["--no-metrics", "--stats-interval", "0"])
    try:
        on.wait_ready(), off.wait_ready()
        tps = {"on": [], "off": []}
        for srv in (on, off):
            run_level(srv.url, prompts[:2], 8, 1)
        for _ in range(args.metrics_cost):
            for key, srv in (("on", on), ("off", off)):
                res, wall = run_level(srv.url, prompts, args.output_len, c)
                tps[key].append(summarize(res, wall)["output_tokens_per_s"])
    finally:
        on.stop(), off.stop()
    med = {k: sorted(v)[len(v) // 2] for k, v in tps.items()}
    return {"concurrency": c, "tokens_per_s": tps, "median_on": med["on"], "median_off": med["off"],
            "cost": 1 - med["on"] / med["off"]}


def _ms(x):
    return "-" if x is None else f"{x * 1e3:.1f}"


def table(name: str, levels: dict, info: dict, peak: dict | None) -> str:
    hdr = (f"{'c':>3s} {'req/s':>6s} {'out tok/s':>9s} | {'TTFT ms mean/med/p90/p99':>25s} | "
           f"{'TPOT ms med/p99':>15s} | {'ITL ms mean/med/p90/p99':>24s} | {'E2E ms med/p99':>15s} | agree")
    lines = [f"== {name}", hdr, "-" * len(hdr)]
    for c, s in levels.items():
        d = {k: s[k] for k in ("ttft_s", "tpot_s", "itl_s", "e2e_s")}
        ag = s["greedy_agreement_with_first_level"]
        lines.append(
            f"{c:>3d} {s['request_throughput']:6.2f} {s['output_tokens_per_s']:9.1f} | "
            f"{'/'.join(_ms(d['ttft_s'][k]) for k in ('mean', 'median', 'p90', 'p99')):>25s} | "
            f"{'/'.join(_ms(d['tpot_s'][k]) for k in ('median', 'p99')):>15s} | "
            f"{'/'.join(_ms(d['itl_s'][k]) for k in ('mean', 'median', 'p90', 'p99')):>24s} | "
            f"{'/'.join(_ms(d['e2e_s'][k]) for k in ('median', 'p99')):>15s} | "
            f"{'-' if ag is None else f'{ag:.4f}'}" + (f"  FAILED {s['failed']}: {s['errors']}" if s["failed"] else "")
            + (f"  experts: hit rate {s['expert_hit_rate']:.3f}, {s['expert_bytes_read_per_token'] / 2**20:.2f} MiB "
               "read/token" if s.get("expert_hit_rate") is not None else ""))
    if info.get("params"):
        p = info["params"]
        lines.append(f"params: total {p['total_params']:,} / active {p['active_params']:,} per token, {info.get('dtype')}")
    gen = "generate(compile=True)" if info.get("generate_compiled") else "generate()"
    if info.get("generate_s_per_token_median"):
        lines.append(f"in-process {gen}: {info['generate_s_per_token_median'] * 1e3:.2f} ms per token (median)")
    if levels.get(1, {}).get("itl_median_over_generate"):
        r = levels[1]["itl_median_over_generate_rounds"]
        lines.append(f"c=1 ITL median / in-process {gen}, paired by round: "
                     f"{levels[1]['itl_median_over_generate']:.3f} (rounds: {', '.join(f'{x:.3f}' for x in r)})")
    if peak:
        lines.append(f"server peak memory: RssAnon {peak['RssAnon'] / 2**20:.1f} MiB, RssFile "
                     f"{peak['RssFile'] / 2**20:.1f} MiB, VmRSS {peak['VmRSS'] / 2**20:.1f} MiB")
    return "\n".join(lines)


def run(args) -> int:
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    targets = list(args.compare) if args.compare else ([args.model_dir] if args.model_dir else [])
    if not targets and not args.url:
        print("moekit bench serve: error: give RUN_DIR, --url or --compare RUN_A RUN_B", file=sys.stderr)
        return 2
    texts = make_workload(args.requests, 4 * args.prompt_len, args.seed)
    report = {"meta": {"threads": args.threads, "max_batch": args.max_batch, "requests": args.requests,
                       "prompt_len": args.prompt_len, "output_len": args.output_len, "seed": args.seed,
                       "deterministic": args.deterministic, "machine": platform.machine(),
                       "python": platform.python_version()}, "runs": {}}
    if args.url:
        print(f"benchmarking {args.url} ...", file=sys.stderr, flush=True)
        res, _ = _levels(args.url, texts, args, levels)
        report["runs"][args.url] = {"levels": res}
        print(table(args.url, res, {}, None))
    for path in targets:
        print(f"{path}: in-process baseline and parameters ...", file=sys.stderr, flush=True)
        model, tok, info, om = _load_model(path, args)
        print(f"{path}: {info['threads']} intra-op thread(s)", file=sys.stderr, flush=True)
        prompts = _token_prompts(tok, texts, args.prompt_len)
        srv = ServerProcess(path, _serve_args(args))
        try:
            srv.wait_ready()
            res, baseline = _levels(srv.url, prompts, args, levels, None if args.no_baseline else model)
        finally:
            rc = srv.stop()
            if om is not None:
                om.close()
        if baseline:
            info["generate_s_per_token_median"] = sorted(baseline)[len(baseline) // 2]
            info["generate_s_per_token_rounds"] = baseline
            info["generate_compiled"] = _compiled_server(args)
        report["runs"][path] = {"levels": res, "info": info, "peak_memory_bytes": srv.peak, "exit_code": rc}
        print(table(path, res, info, srv.peak))
        moe = getattr(model.config, "moe", None)
        if moe is not None:
            work = {c: metrics_work_per_step(model.config.n_layers, moe.num_experts, moe.top_k, min(c, args.max_batch),
                                             compiled=_compiled_server(args))
                    for c in levels}
            report["runs"][path]["metrics_work_per_step_s"] = work
            print(f"metrics work per decode step ({'compiled' if _compiled_server(args) else 'eager'} step, isolated): " + ", ".join(
                f"c={c}: {w * 1e6:.0f} us = {100 * w / res[c]['tpot_s']['median']:.2f}% of its TPOT"
                for c, w in work.items() if res[c]["tpot_s"]["median"]))
        if args.metrics_cost:
            cost = _metrics_cost(path, prompts, args, max(levels))
            report["runs"][path]["metrics_cost"] = cost
            print(f"metrics cost at c={cost['concurrency']}: {cost['cost'] * 100:+.2f}% output tokens/s "
                  f"(median on {cost['median_on']:.1f}, off {cost['median_off']:.1f}; runs {cost['tokens_per_s']})")
    if args.compare:
        a, b = (report["runs"][t] for t in targets)
        print(f"\n{'':24s} {Path(targets[0]).name:>16s} {Path(targets[1]).name:>16s}")
        for key in ("total", "active"):
            print(f"{key + ' params':24s} {a['info']['params'][key + '_params']:16,} {b['info']['params'][key + '_params']:16,}")
        for mem in ("RssAnon", "RssFile"):
            print(f"{'peak ' + mem + ' MiB':24s} {a['peak_memory_bytes'][mem] / 2**20:16.1f} "
                  f"{b['peak_memory_bytes'][mem] / 2**20:16.1f}")
        for c in levels:
            print(f"{f'out tok/s at c={c}':24s} {a['levels'][c]['output_tokens_per_s']:16.1f} "
                  f"{b['levels'][c]['output_tokens_per_s']:16.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    failed = sum(s["failed"] for r in report["runs"].values() for s in r["levels"].values())
    return 1 if failed else 0
