"""`moekit bench layer [--shape A|B|decode|all] [--threads N] [--json PATH]`."""
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

__all__ = ["build_parser", "main"]


def _table(results: list[dict]) -> str:
    hdr = (f"{'shape':8s} {'implementation':30s} {'fwd ms':>9s} {'fwd x dense':>11s} {'fwd GF/s':>9s} "
           f"{'f+b ms':>9s} {'f+b x dense':>11s} {'f+b GF/s':>9s} {'act mem x dense':>15s}")
    lines = [hdr, "-" * len(hdr)]
    for res in results:
        for name, r in res["impls"].items():
            f, b = r["fwd"], r["fwd_bwd"]
            lines.append(f"{res['shape']['key']:8s} {name:30s} {f['median_s'] * 1e3:9.2f} {f['x_dense']:10.2f}x "
                         f"{f['gflops']:9.1f} {b['median_s'] * 1e3:9.2f} {b['x_dense']:10.2f}x {b['gflops']:9.1f} "
                         f"{r['memory_x_dense']:14.2f}x")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """``moekit bench`` with a subparser per benchmark (layer, generate, serve)."""
    p = argparse.ArgumentParser(prog="moekit bench", description=__doc__)
    sub = p.add_subparsers(dest="what", metavar="BENCHMARK")
    lay = sub.add_parser("layer", help="MoE layer vs the dense FFN of the same active size")
    lay.add_argument("--shape", default="all", choices=["A", "B", "decode", "all"], metavar="NAME",
                     help="which layer shape to time; one of: A, B, decode, all (default all)")
    lay.add_argument("--threads", type=int, default=2, metavar="N", help="intra-op CPU threads (default 2)")
    lay.add_argument("--reps", type=int, default=7, metavar="N",
                     help="timed repetitions; the median is reported (default 7)")
    lay.add_argument("--warmup", type=int, default=2, metavar="N",
                     help="untimed repetitions before timing (default 2)")
    lay.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], metavar="NAME",
                     help="dtype of weights and activations; one of: float32, bfloat16 (default float32)")
    lay.add_argument("--no-hf", action="store_true", help="skip transformers' blocks (default off)")
    lay.add_argument("--no-compile", action="store_true",
                     help="skip the torch.compile'd moekit rows, ~1 min of compiling per shape (default off)")
    lay.add_argument("--json", metavar="PATH", help="write all timings here as JSON (default none)")
    from moekit.bench.generate import add_parser as add_generate

    add_generate(sub)
    from moekit.bench.formats import add_parser as add_formats

    add_formats(sub)
    from moekit.cli.bench_train import add_parser as add_train

    add_train(sub)
    from moekit.bench.serve_run import add_arguments as add_serve

    add_serve(sub.add_parser("serve", help="throughput and latency of `moekit serve` under concurrent load"))
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.what is None:
        sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        names = "; ".join(f"{name}: {a.help}" for a in sub._choices_actions for name in [a.dest])
        print(f"moekit bench: error: name a benchmark ({names}); moekit bench BENCHMARK --help for its "
              "options", file=sys.stderr)
        return 2
    if args.what == "serve":
        from moekit.bench.serve_run import run as run_serve

        return run_serve(args)
    if args.what == "generate":
        from moekit.bench.generate import run

        return run(args)
    if args.what == "train":
        from moekit.cli.bench_train import run as run_train

        return run_train(args)
    if args.what == "formats":
        from moekit.bench.formats import run as run_formats

        return run_formats(args)

    from moekit.bench.layer import SHAPE_GROUPS, SHAPES, bench_shape
    from moekit.runtime import configure

    run_settings = configure(args.threads)
    print(f"process settings: {run_settings.describe()} (moekit.runtime)", file=sys.stderr, flush=True)
    dtype = getattr(torch, args.dtype)
    results = []
    for key in SHAPE_GROUPS[args.shape]:
        s = SHAPES[key]
        reps = args.reps if s.tokens > 64 else max(args.reps, 21)
        print(f"shape {key} ({s.name}): d_model {s.d_model}, hidden {s.hidden}, {s.experts} experts, top-{s.top_k}, "
              f"{s.tokens} tokens, {args.dtype}, {args.threads} threads ...", file=sys.stderr, flush=True)
        results.append(bench_shape(s, args.warmup, reps, dtype, not args.no_hf,
                                   lambda m: print(m, file=sys.stderr, flush=True), not args.no_compile))
    print(_table(results))
    print("x dense = dense-equivalent time / time (higher is better); medians of interleaved repetitions; "
          f"{args.dtype}, {run_settings.describe()}")
    if args.json:
        meta = {"torch": torch.__version__, "threads": args.threads, "machine": platform.machine(),
                "python": platform.python_version(), "dtype": args.dtype, "settings": run_settings.to_dict()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    return 0
