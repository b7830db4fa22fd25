"""`moekit train --compare`: a new MoE/dense comparison, or ``--compare --resume DIR`` finishing one."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from moekit.cli.errors import UsageError
from moekit.config import ModelConfig, TrainConfig
from moekit.rundir import COMPARE_FILE, REPORT_DIR, SUMMARY_FILE, RunDir

__all__ = ["resume_compare", "run_compare"]


def run_compare(mcfg: ModelConfig, tcfg: TrainConfig, out: Path, data: Any, seeds: int, *,
                resume: bool = False, jobs: int = 1) -> int:
    from moekit.train.compare import compare, format_summary

    summary = compare(mcfg, tcfg, out, data, seeds=seeds, resume=resume, jobs=jobs)
    if summary.get("interrupted"):
        print(f"comparison interrupted; finish it with: moekit train --compare --resume {out}", file=sys.stderr)
        return 130
    print(format_summary(summary))
    print(f"summary: {out / SUMMARY_FILE}")
    write_compare_report(out, summary)
    return 0


def _first_moe_run(out: Path, plan: dict[str, Any]) -> RunDir:
    seed = plan["train"]["seed"]
    return RunDir(out / "moe" if plan["seeds"] == 1 else out / "moe" / f"seed{seed}")


def _legacy_plan(out: Path) -> dict[str, Any]:
    """A comparison written before compare.json existed: its seeds and config from the MoE runs."""
    seed_dirs = sorted((out / "moe").glob("seed*"))
    first = RunDir(seed_dirs[0] if seed_dirs else out / "moe")
    if not first.is_run():
        raise UsageError(f"--resume {out}: no {COMPARE_FILE} and no moe/ run there; not a moekit comparison")
    tcfg = first.train_config()
    if seed_dirs:
        tcfg = tcfg.replace(seed=min(int(p.name.removeprefix("seed")) for p in seed_dirs))
    return {"seeds": max(1, len(seed_dirs)), "train": tcfg.to_dict(), "done": {}}


def resume_compare(out: Path, overrides: dict[str, Any], prepare, jobs: int = 1) -> int:
    """Finish the comparison in ``out``: each unfinished seed and side, then the summary and the report.
    ``prepare(out, tcfg)`` prepares the data as the new comparison did."""
    extra = sorted(k for k in overrides if k != "threads")
    if extra:
        raise UsageError(f"--compare --resume {out} finishes the comparison as it was planned; "
                         f"{', '.join('--' + k.replace('_', '-') for k in extra)} would change it: drop them")
    plan = RunDir(out).compare_plan() or _legacy_plan(out)
    tcfg = TrainConfig.from_dict(plan["train"]).replace(**overrides)
    first = _first_moe_run(out, plan)
    if not first.is_run():
        raise UsageError(f"--resume {out}: the comparison's first MoE run {first.path} has no config; "
                         "start over with --compare --overwrite")
    data = prepare(out, tcfg)
    return run_compare(first.config(), tcfg, out, data, plan["seeds"], resume=True, jobs=jobs)


def write_compare_report(out: Path, summary: dict) -> None:
    """The HTML report of the comparison, every seed of both sides."""
    from moekit.analysis.report import write_report

    runs = [Path(r["run_dir"]) for r in summary["moe"]["per_seed"] + summary["dense"]["per_seed"]]
    path = write_report(runs, out / REPORT_DIR)
    print(f"report: {path}")
