"""``moekit prune RUN_DIR --keep N --method frequency|reap [--calib PATH] --out DIR``: remove experts
per layer.

Each MoE layer keeps its N best experts by routing frequency or REAP (router-weighted expert activation
norm, arXiv 2510.13999) on calibration tokens (default: the run's validation split, 32k tokens); router
rows and expert slices go together. ``--keep`` must be in [1, E-1]; below top_k, top_k is clamped to N
with a warning. The result is a normal run directory (generate, convert, train --init-from).
"""
from __future__ import annotations

import argparse
import sys
import warnings

from moekit.cli.compress_common import fail, load_source, run_command, save_run
from moekit.rundir import RunDir

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moekit prune", description=__doc__.split("\n\n")[0].strip("`"))
    p.add_argument("run", metavar="RUN_DIR", help="moekit MoE run directory")
    p.add_argument("--keep", type=int, required=True, metavar="N",
                   help="experts to keep per MoE layer, 1 to E-1 (default none: required)")
    p.add_argument("--method", default="reap", choices=("frequency", "reap"), metavar="NAME",
                   help="expert score; one of: frequency (routing frequency), reap (router-weighted expert "
                        "activation norm) (default reap)")
    p.add_argument("--calib", metavar="PATH",
                   help="calibration text / token .bin (default none: the run's validation split)")
    p.add_argument("--calib-tokens", type=int, default=32768, metavar="N",
                   help="calibration tokens (default 32768)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output run directory (default none: required)")
    return p


def _run(args: argparse.Namespace) -> int:
    from moekit.compress.calib import calibration_batches
    from moekit.compress.prune import expert_scores, kept_experts, prune_model, pruned_config

    src, model = load_source(args.run, args.out)
    if not model.moe_layers():
        fail(f"{args.run}: the model has no MoE layer to prune (a dense run)")
    if getattr(model, "quant_spec", None) is not None:
        fail(f"{args.run}: a quantized run; prune the unquantized run, then quantize")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned_config(model.config, args.keep)  # validates --keep before the calibration pass
    for w in caught:
        print(f"moekit prune: warning: {w.message}", file=sys.stderr)
    scores = expert_scores(model, calibration_batches(src, args.calib, "val", max_tokens=args.calib_tokens),
                           args.method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported above
        pruned = prune_model(model, scores, args.keep)
    save_run(pruned, src, RunDir(args.out))
    before, after = model.num_params(), pruned.num_params()
    for name, s in scores.items():
        print(f"{name}: keep {kept_experts(s, args.keep)}")
    print(f"params {before['total_params']:,} -> {after['total_params']:,} total, {before['active_params']:,} -> "
          f"{after['active_params']:,} active | {args.method} | -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("prune", lambda: _run(args))


if __name__ == "__main__":
    raise SystemExit(main())
