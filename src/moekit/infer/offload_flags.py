"""The command-line flags of expert offloading, shared by `moekit generate`, `moekit serve` and
`moekit bench generate`: --expert-memory, --expert-cache, --prefetch / --no-prefetch, --read.

The values go to :func:`moekit.infer.offload.load_offloaded` as ``expert_memory``, ``policy``,
``prefetch`` and ``read`` (see :func:`offload_kwargs`).
"""
from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_offload_args", "offload_kwargs"]


def add_offload_args(p: argparse.ArgumentParser, *, none_means: str = "load everything") -> Any:
    """The flags in their own help group (returned, for a caller's extra flags such as --trace)."""
    g = p.add_argument_group("experts beyond RAM")
    g.add_argument("--expert-memory", default=None, metavar="SIZE",
                   help="keep the routed experts on disk with a cache of SIZE shared by all layers (2GiB, "
                        f"500MB; 0 = no cache; all = cache every expert on first use) (default none: {none_means})")
    g.add_argument("--expert-cache", default="lru", choices=["lru", "lfu"], metavar="NAME",
                   help="with --expert-memory: cache policy; one of: lru, lfu (default lru)")
    g.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True,
                   help="with --expert-memory: load the next layer's predicted experts in the background "
                        "(default on)")
    g.add_argument("--read", default="pread", choices=["pread", "mmap"], metavar="NAME",
                   help="with --expert-memory: how experts are read; one of: pread (page cache dropped after "
                        "each read, bounded), mmap (safetensors' memory map) (default pread)")
    return g


def offload_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``load_offloaded``'s keywords from the parsed flags (expert_memory included)."""
    return {"expert_memory": args.expert_memory, "policy": args.expert_cache, "prefetch": args.prefetch,
            "read": args.read}
