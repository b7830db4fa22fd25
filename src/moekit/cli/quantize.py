"""``moekit quantize RUN_DIR --format int8|int4 [--group 32|64|128] --out DIR``: weight-only quantization.

Every routed expert weight is quantized (a count checks 100 %); shared experts and attention only with
``--include shared,attention``; embeddings, norms, routers and the LM head stay in their dtype. GPTQ on
calibration tokens (default: the run's train split) unless ``--method rtn``. ``--eval`` compares with the
source on the validation split (KL, top-1 agreement, perplexity).
"""
from __future__ import annotations

import argparse
import json

from moekit.cli.compress_common import fail, load_source, run_command
from moekit.rundir import RunDir

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moekit quantize", description=__doc__.split("\n\n")[0].strip("`"))
    p.add_argument("run", metavar="RUN_DIR", help="moekit run directory to quantize")
    p.add_argument("--format", required=True, choices=("int8", "int4"), metavar="NAME",
                   help="weight format; one of: int8 (a scale per expert row), int4 (symmetric, a scale "
                        "per group of inputs) (default none: required)")
    p.add_argument("--group", type=int, choices=(32, 64, 128), metavar="N",
                   help="int4 only: inputs per scale; one of: 32, 64, 128 (default 32)")
    p.add_argument("--include", default="", metavar="LIST",
                   help="also quantize these, comma-separated: shared, attention (default empty: the routed "
                        "experts only)")
    p.add_argument("--method", default="gptq", choices=("gptq", "rtn"), metavar="NAME",
                   help="quantizer; one of: gptq (error-compensating, needs calibration tokens), rtn (round "
                        "to nearest) (default gptq)")
    p.add_argument("--calib", metavar="PATH",
                   help="gptq calibration text / token .bin (default none: the run's train split)")
    p.add_argument("--calib-tokens", type=int, default=16384, metavar="N",
                   help="calibration tokens (default 16384)")
    p.add_argument("--eval", action="store_true",
                   help="compare with the source on the validation split: KL, top-1 agreement, perplexity "
                        "(default off)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output run directory (default none: required)")
    return p


def _run(args: argparse.Namespace) -> int:
    from moekit.compress.calib import calibration_batches
    from moekit.compress.quantize import QuantSpec, collect_hessians, coverage, quantize_model, save_quantized
    from moekit.spec.quant import quant_summary

    if args.format == "int8" and args.group is not None:
        fail("--group applies to --format int4 only (int8 has one scale per expert row)")
    include = tuple(x for x in args.include.split(",") if x)
    spec = QuantSpec(args.format, args.group or 32 if args.format == "int4" else None, include, args.method)
    src, model = load_source(args.run, args.out)
    if not model.moe_layers():
        fail(f"{args.run}: the model has no MoE layer (no routed experts to quantize)")
    if getattr(model, "quant_spec", None) is not None:
        fail(f"{args.run}: already quantized ({model.quant_spec.fmt}); quantize the unquantized run")
    hessians, n = None, 0
    if spec.method == "gptq":
        batches = calibration_batches(src, args.calib, "train", max_tokens=args.calib_tokens)
        hessians, n = collect_hessians(model, batches, include)
    spec = QuantSpec(spec.fmt, spec.group, spec.include, spec.method, n)
    ref = src.load_model() if args.eval else None
    quantize_model(model, spec, hessians)
    cov = coverage(model)
    routed = cov["routed_experts"]
    if routed["quantized"] != routed["total"]:  # a routed expert weight left behind would be a bug
        raise RuntimeError(f"only {routed['quantized']} of {routed['total']} routed-expert weights are quantized")
    out = RunDir(args.out)
    save_quantized(model, src, out)
    s = quant_summary(out)
    print(f"quantized {routed['quantized']:,} of {routed['total']:,} routed-expert weights (100%), "
          + ", ".join(f"{k} {v['quantized']:,}/{v['total']:,}" for k, v in cov.items() if k != "routed_experts")
          + f" | {spec.fmt}{f' group {spec.group}' if spec.group else ''} {spec.method}"
          + (f" ({n} calibration tokens)" if n else ""))
    print(f"routed experts: {s['routed_experts']['bytes']:,} bytes, {s['routed_experts']['bits_per_weight']:.3f} "
          f"bits/weight (scales included) | file {s['file_bytes']:,} bytes -> {out.path}")
    if ref is not None:
        from moekit.compress.calib import split_tokens
        from moekit.compress.evaluate import compare_models
        from moekit.data import TokenDataset

        val = TokenDataset(split_tokens(src, "val")).iter_eval_batches(16, 128)
        print(json.dumps(compare_models(ref, model, val)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("quantize", lambda: _run(args))


if __name__ == "__main__":
    raise SystemExit(main())
