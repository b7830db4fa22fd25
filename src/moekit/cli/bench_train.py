"""`moekit bench train [--rounds R] [--steps N] [--threads N] [--json PATH] [-- TRAIN FLAGS]`: the command
line of moekit.bench.train. Flags after ``--`` are `moekit train`'s model and training flags
(``--d-model 64 --batch-size 32``), parsed by its own parser."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from moekit.cli.errors import UsageError, guarded

__all__ = ["add_parser", "run"]

# what the benchmark decides itself: not accepted among the flags passed on to the model / training config
_OWN = ("--out", "--resume", "--compare", "--dense", "--threads", "--steps", "--nproc", "--ep", "--init-from")


def add_parser(sub: Any) -> None:
    g = sub.add_parser("train", help="training tokens/s of the MoE LM vs its dense twin, steps interleaved")
    g.add_argument("--rounds", type=int, default=8, metavar="R",
                   help="rounds of MoE steps then dense steps, the order alternating (default 8)")
    g.add_argument("--steps", type=int, default=10, metavar="N", help="timed steps per model per round (default 10)")
    g.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed steps per model first (default 3)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="intra-op CPU threads (default none: what `moekit train` uses, torch's default)")
    g.add_argument("--work", default=None, metavar="DIR",
                   help="where the corpus's token files are built and reused (default none: a temporary "
                        "directory, ~5 s to build)")
    g.add_argument("--json", metavar="PATH", help="write every round's timings here as JSON (default none)")
    g.add_argument("train_flags", nargs=argparse.REMAINDER, metavar="TRAIN_FLAGS",
                   help="model and training flags of `moekit train` (e.g. -- --d-model 64 --batch-size 32)")


def _configs(flags: list[str]):
    from moekit.cli.train import build_parser as train_parser
    from moekit.cli.train import resolve_configs

    flags = flags[1:] if flags[:1] == ["--"] else flags
    bad = sorted({a.split("=")[0] for a in flags if a.split("=")[0] in _OWN})
    if bad:
        raise UsageError(f"{', '.join(bad)}: moekit bench train decides these itself; drop them")
    try:
        return resolve_configs(train_parser().parse_args(flags))
    except ValueError as e:
        raise UsageError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    def body() -> int:
        import torch

        from moekit.bench.train import bench_train, table
        from moekit.data import prepare_data
        from moekit.rundir import atomic_write_json
        from moekit.runtime import configure

        for name in ("rounds", "steps"):
            if getattr(args, name) < 1:
                raise UsageError(f"--{name} {getattr(args, name)} must be >= 1")
        if args.warmup < 0:
            raise UsageError(f"--warmup {args.warmup} must be >= 0")
        if args.threads is not None and args.threads < 1:
            raise UsageError(f"--threads {args.threads} must be >= 1")
        mcfg, tcfg = _configs(args.train_flags)
        settings = configure(args.threads)

        def log(msg: str) -> None:
            print(msg, file=sys.stderr, flush=True)

        log(f"process settings: {settings.describe()} (moekit.runtime)")
        with tempfile.TemporaryDirectory(prefix="moekit-bench-train-") as tmp:
            data_dir = Path(args.work) if args.work else Path(tmp) / "data"
            data = prepare_data(data_dir, tcfg.data, tcfg.vocab_size, tcfg.max_data_bytes)
            mcfg = mcfg.replace(vocab_size=data.vocab_size)
            res = bench_train(mcfg, tcfg, data, Path(tmp), rounds=args.rounds, steps=args.steps,
                              warmup=args.warmup, log=log)
        res["settings"] = settings.to_dict() | {"torch": torch.__version__, "dtype": "float32"}
        print(table(res))
        print(f"medians of interleaved rounds; float32, {settings.describe()}")
        if args.json:
            atomic_write_json(Path(args.json), res)
        return 0

    return guarded("moekit bench train", body)
