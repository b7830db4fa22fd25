"""The expert-offloading flags of `moekit generate`: --expert-memory, --expert-cache, --prefetch, --trace, --read."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from moekit.infer.offload_flags import add_offload_args as shared_offload_args
from moekit.infer.offload_flags import offload_kwargs

__all__ = ["add_offload_args", "load_offloaded_from_args", "report_offload"]


def add_offload_args(p: argparse.ArgumentParser) -> None:
    g = shared_offload_args(p)
    g.add_argument("--trace", default=None, metavar="PATH",
                   help="with --expert-memory: write the expert trace (JSON) here (default none)")


def load_offloaded_from_args(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, tokenizer, OffloadedModel)."""
    from moekit.infer.offload import load_offloaded

    om = load_offloaded(args.run_dir, **offload_kwargs(args))
    if om.tokenizer is None:
        raise FileNotFoundError(f"{args.run_dir}: no tokenizer.json; generate needs one to encode the prompt")
    return om.model, om.tokenizer, om


def report_offload(args: argparse.Namespace, om: Any) -> None:
    """Cache figures to stderr; the trace (with its replay through Belady's MIN) to --trace."""
    from moekit.infer.cache import replay
    from moekit.infer.memory import rss

    st, r = om.stats(), rss()
    opt = replay(om.cache.trace, "min")["hit_rate"]
    print(f"[experts] {args.expert_cache} cache of {st['capacity_experts']} experts "
          f"({st['budget_bytes'] / 2**20:.0f} MiB): hit rate {st['hit_rate']:.3f} (Belady's MIN {opt:.3f}), "
          f"{st['bytes_read'] / 2**20:.0f} MiB read, stalled {st['stall_s']:.2f}s, prefetch recall "
          f"{st['prefetch_recall']:.2f} | RSS anon {r['anon'] / 2**20:.0f} MiB, file {r['file'] / 2**20:.0f} MiB",
          file=sys.stderr)
    for layer, s in st["per_layer"].items():
        print(f"[experts]   layer {layer}: {s['hits']}/{s['accesses']} hits, {s['prefetch_hits']} prefetched, "
              f"{s['bytes_read'] / 2**20:.0f} MiB read, stall {s['stall_s']:.2f}s", file=sys.stderr)
    if args.trace:
        om.save_trace(args.trace)
    om.close()
