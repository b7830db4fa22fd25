"""`moekit bench formats RUN_DIR --expert-memory SIZE [--formats fp32,bf16,int8,int4] [--group 32] [--json PATH]`:
the same model with its experts stored as fp32, bf16, int8 and int4, offloaded at ONE expert-cache byte
budget: how many experts the budget holds, hit rate, decode tokens/s, RSS, and quality against fp32.

Legend: P prompts, S tokens per prompt, V vocabulary.

1. the formats are written once into ``--work`` (default: beside RUN_DIR, ``RUN_DIR.formats``): bf16 as a
   cast copy of the run, int8 / int4 by ``moekit.compress.quantize`` rounding to nearest (for GPTQ, quantize
   with ``moekit quantize`` and bench each run with ``moekit bench generate``);
2. each format in its own process (so RSS is its own): ``bench_generate`` at batch 1 with the budget, then
   the logits (P, S, V) of a fixed prompt set through the same offloaded model;
3. quality: mean KL(fp32 || format) in nats per token and top-1 agreement with fp32 over those logits.
fp32 must be among the formats for the quality columns.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["add_parser", "bench_formats", "run", "worker"]

FORMATS = ("fp32", "bf16", "int8", "int4")


def add_parser(sub: Any) -> None:
    g = sub.add_parser("formats", help="fp32 / bf16 / int8 / int4 experts at one expert-cache byte budget")
    g.add_argument("run_dir", metavar="RUN_DIR", help="a moekit run directory with fp32 experts")
    g.add_argument("--expert-memory", required=True, metavar="SIZE",
                   help="the expert-cache budget every format gets (2GiB, 500MB) (default none: required)")
    g.add_argument("--formats", default=",".join(FORMATS), metavar="LIST",
                   help=f"comma-separated formats among {', '.join(FORMATS)} (default all)")
    g.add_argument("--group", type=int, default=32, metavar="N", help="int4 inputs per scale (default 32)")
    g.add_argument("--expert-cache", default="lru", choices=["lru", "lfu"], metavar="NAME",
                   help="cache policy; one of: lru, lfu (default lru)")
    g.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True,
                   help="load the next layer's predicted experts in the background (default on)")
    g.add_argument("--prompt-len", type=int, default=32, metavar="N", help="tokens of the decode prompt (default 32)")
    g.add_argument("--new-tokens", type=int, default=32, metavar="N", help="tokens decoded greedily (default 32)")
    g.add_argument("--quality-prompts", default="4x64", metavar="PxS",
                   help="the fixed random prompt set of the quality columns: P prompts of S tokens (default 4x64)")
    g.add_argument("--threads", type=int, default=2, metavar="N", help="intra-op CPU threads (default 2)")
    g.add_argument("--work", default=None, metavar="DIR",
                   help="where the format copies are written and reused (default none: RUN_DIR.formats)")
    g.add_argument("--json", metavar="PATH", help="write every format's figures here as JSON (default none)")


def _prepare(src: Path, work: Path, fmt: str, group: int) -> Path:
    """The run directory of ``fmt`` (the source itself for fp32), written once."""
    from moekit.rundir import RunDir

    if fmt == "fp32":
        return src
    out = RunDir(work / fmt)
    if out.is_run():
        return out.path
    print(f"bench formats: writing the {fmt} copy to {out.path} ...", file=sys.stderr, flush=True)
    if fmt == "bf16":
        out.save_model(RunDir(src).load_model(torch.bfloat16))
        if RunDir(src).tokenizer_path.is_file():
            out.copy_tokenizer(RunDir(src).tokenizer_path)
        return out.path
    from moekit.compress.quantize import QuantSpec, quantize_model, save_quantized

    spec = QuantSpec(fmt, group if fmt == "int4" else None, method="rtn")
    save_quantized(quantize_model(RunDir(src).load_model(), spec), RunDir(src), out)
    return out.path


@torch.no_grad()
def worker(spec: dict[str, Any]) -> None:
    """One format, in its own process: the decode figures, then the quality logits saved to spec["logits"]."""
    from moekit.bench.generate import bench_generate
    from moekit.infer.offload import load_offloaded
    from moekit.runtime import configure

    configure(spec["threads"])
    res = bench_generate(spec["path"], 1, spec["expert_memory"], spec["policy"], spec["prefetch"],
                         prompt_len=spec["prompt_len"], new_tokens=spec["new_tokens"])
    om = load_offloaded(spec["path"], spec["expert_memory"], policy=spec["policy"], prefetch=spec["prefetch"])
    try:
        P, S = spec["prompts"]
        V = om.model.config.vocab_size
        ids_PS = torch.randint(0, V, (P, S), generator=torch.Generator().manual_seed(1234))
        torch.save(om.model(ids_PS).logits.float(), spec["logits"])
    finally:
        om.close()
    Path(spec["result"]).write_text(json.dumps(res))


def _spawn(spec: dict[str, Any]) -> dict[str, Any]:
    code = "import json, sys; from moekit.bench.formats import worker; worker(json.load(sys.stdin))"
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(spec), text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"bench formats: the {spec['fmt']} run failed (exit {proc.returncode})")
    return json.loads(Path(spec["result"]).read_text())


def _quality(ref_PSV: torch.Tensor, got_PSV: torch.Tensor) -> dict[str, float]:
    lr, lo = ref_PSV.double().log_softmax(-1), got_PSV.double().log_softmax(-1)
    return {"kl_mean": float((lr.exp() * (lr - lo)).sum(-1).mean()),
            "top1_agreement": float((lr.argmax(-1) == lo.argmax(-1)).double().mean())}


def bench_formats(path: str, expert_memory: str, formats: list[str], *, group: int = 32, policy: str = "lru",
                  prefetch: bool = True, prompt_len: int = 32, new_tokens: int = 32, prompts: tuple[int, int] = (4, 64),
                  threads: int = 2, work: str | None = None) -> list[dict[str, Any]]:
    """Per format: the ``bench_generate`` figures at ``expert_memory``, plus ``format``, ``kl_mean`` and
    ``top1_agreement`` against fp32 (when fp32 is among ``formats``)."""
    bad = sorted(set(formats) - set(FORMATS))
    if bad:
        raise ValueError(f"formats {bad} are unknown; choose from {', '.join(FORMATS)}")
    src = Path(path)
    wdir = Path(work) if work else src.with_name(src.name + ".formats")
    wdir.mkdir(parents=True, exist_ok=True)
    rows, logits = [], {}
    for fmt in formats:
        spec = {"fmt": fmt, "path": str(_prepare(src, wdir, fmt, group)), "expert_memory": expert_memory,
                "policy": policy, "prefetch": prefetch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                "prompts": list(prompts), "threads": threads, "logits": str(wdir / f"{fmt}.logits.pt"),
                "result": str(wdir / f"{fmt}.result.json")}
        print(f"bench formats: {fmt} at {expert_memory} ...", file=sys.stderr, flush=True)
        rows.append({"format": fmt, **_spawn(spec)})
        logits[fmt] = spec["logits"]
    if "fp32" in logits:
        ref = torch.load(logits["fp32"])
        for r in rows:
            r |= _quality(ref, torch.load(logits[r["format"]]))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table."""
    hdr = ("| format | bytes/expert | experts held | hit rate (MIN) | decode tok/s | peak RSS anon / file MiB "
           "| KL vs fp32 | top-1 vs fp32 |\n|---|---|---|---|---|---|---|---|")
    lines = [hdr]
    for r in rows:
        kl = f"{r['kl_mean']:.2e}" if "kl_mean" in r else "-"
        top1 = f"{r['top1_agreement'] * 100:.1f}%" if "top1_agreement" in r else "-"
        lines.append(f"| {r['format']} | {r['expert_bytes']:,} | {r['cache_capacity_experts']} | "
                     f"{r['expert_hit_rate']:.3f} ({r['optimal_hit_rate']:.3f}) | {r['tokens_per_s']:.2f} | "
                     f"{r['peak_rss_anon_bytes'] / 2**20:.0f} / {r['peak_rss_file_bytes'] / 2**20:.0f} | {kl} | {top1} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        P, S = (int(x) for x in args.quality_prompts.lower().split("x"))
        rows = bench_formats(args.run_dir, args.expert_memory, [f for f in args.formats.split(",") if f],
                             group=args.group, policy=args.expert_cache, prefetch=args.prefetch,
                             prompt_len=args.prompt_len, new_tokens=args.new_tokens, prompts=(P, S),
                             threads=args.threads, work=args.work)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"moekit bench formats: error: {e}", file=sys.stderr)
        return 1
    print(table(rows))
    if args.json:
        from moekit.rundir import atomic_write_json

        meta = {"torch": torch.__version__, "threads": args.threads, "run_dir": args.run_dir,
                "expert_memory": args.expert_memory}
        atomic_write_json(args.json, {"meta": meta, "results": rows})
    return 0
