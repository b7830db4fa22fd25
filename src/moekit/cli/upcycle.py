"""``moekit upcycle RUN_DIR --experts E --top-k K [--granularity G] [--router NAME] --out DIR``.

Every dense FFN (hidden F) becomes E experts of hidden F/G: expert e = c*G + s is hidden slice s of copy
c = e // G of the dense FFN. The router starts so that at step 0 the MoE computes exactly the dense model
(moekit.compress.upcycle tables each router's start and output scale); routers with no exact start are
refused by name. Continue with ``moekit train --init-from DIR``.
"""
from __future__ import annotations

import argparse

import torch

from moekit.cli.compress_common import load_source, run_command, save_run
from moekit.rundir import RunDir

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    from moekit.compress.upcycle import UPCYCLE_ROUTERS

    p = argparse.ArgumentParser(prog="moekit upcycle", description=__doc__.split("\n\n")[0].strip("`"))
    p.add_argument("run", metavar="RUN_DIR", help="dense moekit run directory (moekit train --dense)")
    p.add_argument("--experts", type=int, required=True, metavar="E",
                   help="experts per MoE layer, all slices (default none: required)")
    p.add_argument("--top-k", type=int, required=True, metavar="K",
                   help="experts per token, a multiple of G (default none: required)")
    p.add_argument("--granularity", type=int, default=1, metavar="G",
                   help="slices per dense FFN, each expert of hidden F/G (default 1)")
    p.add_argument("--router", default="topk", metavar="NAME",
                   help=f"router kind; one of: {', '.join(UPCYCLE_ROUTERS)} (default topk)")
    p.add_argument("--no-norm-topk", action="store_true",
                   help="do not renormalise the top-k weights (default off: renormalised)")
    p.add_argument("--router-init", choices=("random", "zero"), metavar="NAME",
                   help="router start; one of: random, zero (default none: random where exact, else zero)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the random router rows (default 0)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output run directory (default none: required)")
    return p


def _run(args: argparse.Namespace) -> int:
    from moekit.compress.upcycle import upcycle_model

    src, dense = load_source(args.run, args.out)
    moe = upcycle_model(dense, args.experts, args.top_k, args.granularity, args.router, not args.no_norm_topk,
                        args.router_init, args.seed)
    # check the exact start on a probe batch
    ids = torch.randint(0, dense.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((moe(ids).logits - dense(ids).logits).abs().max())
    save_run(moe, src, RunDir(args.out))
    r, n = moe.upcycle_rule, moe.num_params()
    print(f"upcycled {len(moe.moe_layers())} FFNs -> {args.experts} experts of hidden {moe.config.moe.d_hidden}, "
          f"top-{moe.config.moe.top_k}, router {args.router} ({r.router_init} start, outputs x{r.scale:g}) | "
          f"params {n['total_params']:,} total, {n['active_params']:,} active | step-0 max |logit diff| "
          f"{diff:.2e} | -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("upcycle", lambda: _run(args))


if __name__ == "__main__":
    raise SystemExit(main())
