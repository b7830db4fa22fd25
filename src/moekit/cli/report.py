"""`moekit report RUN_DIR [RUN_DIR ...]`: one self-contained HTML report (+ PNGs) of training runs."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from moekit.cli.errors import readable_run

__all__ = ["build_parser", "expand_run_dirs", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moekit report",
        description="Write report.html (figures embedded) and its PNGs: loss against steps and wall time, "
                    "expert-load heatmaps, routing health, collapse warnings, expert specialization, "
                    "parameters and tokens/s of every run given.")
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIRS",
                   help="run directories; a folder of runs (e.g. a --compare output) stands for the runs in it")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (default none: report/ in the one path given, else in the runs' "
                        "common parent)")
    p.add_argument("--spec-tokens", type=int, default=4096, metavar="N",
                   help="held-out tokens for the specialization tables, 0 = skip them (default 4096)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default none: torch's choice)")
    return p


def expand_run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories (holding metrics.jsonl) for each path: itself, or the runs up to two levels below
    it (``moekit train --compare`` writes DIR/moe and DIR/dense, with seeds DIR/moe/seed0 ...)."""
    from moekit.rundir import METRICS_FILE

    out: list[Path] = []
    for p in paths:
        if (p / METRICS_FILE).is_file():
            out.append(p)
            continue
        found = sorted(m.parent for m in list(p.glob(f"*/{METRICS_FILE}")) + list(p.glob(f"*/*/{METRICS_FILE}")))
        if not found:
            raise FileNotFoundError(f"{p}: no {METRICS_FILE} in it or in its subfolders; is it a moekit run?")
        moe_first = sorted(found, key=lambda d: (0 if "moe" in d.parts[len(p.parts):] else 1, str(d)))
        out.extend(moe_first)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = [readable_run(r, "moekit report") for r in expand_run_dirs(args.run_dirs)]
    except FileNotFoundError as e:
        print(f"moekit report: error: {e}", file=sys.stderr)
        return 2
    if args.out is not None:
        out = args.out
    elif len(args.run_dirs) == 1:
        out = args.run_dirs[0] / "report"
    else:
        out = Path(os.path.commonpath([str(r.resolve()) for r in runs])) / "report"
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from moekit.analysis.report import write_report

    try:
        path = write_report(runs, out, spec_tokens=args.spec_tokens)
    except (ValueError, OSError) as e:  # an empty or damaged metrics.jsonl, a config that is not JSON
        print(f"moekit report: error: {e}", file=sys.stderr)
        return 1
    print(f"report: {path} ({len(runs)} run(s): {', '.join(str(r) for r in runs)})")
    return 0
