"""`moekit sweep --experts 1,2,4,8 [--top-k K] [--steps N] [--seeds S] [--out DIR] [-- TRAIN FLAGS]`:
the same model at each expert count and equal active parameters per token (1 = the dense twin), the
same data, steps and seeds, one `moekit train` process per run, ``--jobs`` of them at a time.

Resumable: run the same command again after a kill and finished runs are kept, interrupted ones resume
from their checkpoints, the rest start. Writes ``DIR/sweep.json`` and ``DIR/report.html``
(moekit.analysis.sweep). Flags after the sweep's own go to every `moekit train` (model and training
flags, e.g. ``--d-model 64 --seq-len 256 --lr 2e-3``).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from moekit.cli.errors import UsageError, guarded
from moekit.rundir import SWEEP_FILE, SWEEP_PLAN_FILE, RunDir, atomic_write_json
from moekit.rundir.occupancy import holds_run, remove_run

__all__ = ["build_parser", "main", "plan_runs", "run_argv"]

# what the sweep decides per run: not accepted among the flags passed on to `moekit train`
_OWN = ("--experts", "--moe.num-experts", "--top-k", "--moe.top-k", "--steps", "--seed", "--out", "--dense",
        "--compare", "--seeds", "--resume", "--threads", "--overwrite", "--nproc", "--ep", "--init-from")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moekit sweep", description=__doc__.split("\n\n")[0],
                                usage="%(prog)s --experts LIST [options] [TRAIN FLAGS]")
    p.add_argument("--experts", required=True, metavar="LIST",
                   help="comma-separated expert counts, 1 = the dense twin (default none: required)")
    p.add_argument("--top-k", type=int, default=2, metavar="K",
                   help="experts per token, the same at every count (default 2: with 1 and the renormalised "
                        "topk router every routing weight is 1, and more experts measured worse)")
    p.add_argument("--steps", type=int, default=600, metavar="N", help="training steps of every run (default 600)")
    p.add_argument("--seeds", type=int, default=3, metavar="S", help="seeds per expert count, from 0 (default 3)")
    p.add_argument("--out", type=Path, default=Path("runs/sweep"), metavar="DIR",
                   help="where the runs, sweep.json and report.html go (default runs/sweep)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="runs trained at the same time (default the number of CPUs)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch threads of each run (default 1: one run per core)")
    return p


def _counts(text: str, top_k: int) -> list[int]:
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--experts {text!r}: expected comma-separated integers such as 1,2,4,8") from None
    if not counts or counts[0] < 1:
        raise UsageError(f"--experts {text!r}: expert counts must be >= 1")
    low = [e for e in counts if 1 < e < top_k]
    if low:
        raise UsageError(f"--experts {low}: fewer experts than --top-k {top_k}; drop them or lower --top-k")
    return counts


def plan_runs(args: argparse.Namespace, passed: list[str]) -> dict[str, Any]:
    """The sweep's plan: expert counts, seeds, steps and the flags every run shares."""
    bad = sorted({a.split("=")[0] for a in passed if a.split("=")[0] in _OWN})
    if bad:
        raise UsageError(f"{', '.join(bad)}: the sweep sets these for each run itself; drop them")
    for name in ("steps", "seeds", "jobs", "threads", "top_k"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    return {"experts": _counts(args.experts, args.top_k), "top_k": args.top_k, "steps": args.steps,
            "seeds": list(range(args.seeds)), "train_flags": passed}


def run_dir(out: Path, experts: int, seed: int) -> Path:
    return out / ("dense" if experts == 1 else f"e{experts}") / f"seed{seed}"


def run_argv(plan: dict[str, Any], out: Path, experts: int, seed: int, threads: int) -> list[str]:
    """The `moekit train` arguments of one run: a new run, or --resume of an interrupted one."""
    d = run_dir(out, experts, seed)
    run = RunDir(d)
    if run.has_checkpoint():
        return ["--resume", str(d), "--threads", str(threads)]
    # 1 expert: the dense twin, one SwiGLU FFN of top_k x the expert width (moekit.train.compare)
    model = ["--dense", "--experts", str(plan["top_k"])] if experts == 1 else ["--experts", str(experts)]
    return [*plan["train_flags"], "--out", str(d), *model, "--top-k", str(plan["top_k"]), "--steps",
            str(plan["steps"]), "--seed", str(seed), "--threads", str(threads)]


def _finished(plan: dict[str, Any], out: Path, experts: int, seed: int) -> bool:
    run = RunDir(run_dir(out, experts, seed))
    return run.has_checkpoint() and run.read_manifest().get("step") == plan["steps"]


def _load_plan(out: Path, plan: dict[str, Any]) -> None:
    path = out / SWEEP_PLAN_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        # the same sweep with more expert counts (the finished runs are kept: same flags, steps, seeds)
        grown = (old.get("experts") is not None and set(old["experts"]) <= set(plan["experts"])
                 and {k: v for k, v in old.items() if k != "experts"} == {k: v for k, v in plan.items() if k != "experts"})
        if old != plan and not grown:
            raise UsageError(f"{out} holds another sweep ({path}: {json.dumps(old)}); run that same command to "
                             "finish it (more --experts may be added), or pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, plan)


def _link_data(shared: Path, run: RunDir) -> None:
    if not run.data_dir.exists():
        run.data_dir.mkdir(parents=True)
        for f in shared.iterdir():
            os.link(f, run.data_dir / f.name)


def _prepare_data(plan: dict[str, Any], out: Path) -> None:
    """Prepare the data once and hard-link it into every run (prepare_data reuses a matching build). A run
    killed before its first checkpoint has nothing to resume: its files go, the data link stays."""
    from moekit.cli.train import build_parser as train_parser
    from moekit.cli.train import resolve_configs
    from moekit.data import prepare_data

    # the data flags only matter here, but the model flags must still make a valid config
    flags = [*plan["train_flags"], "--top-k", str(plan["top_k"]), "--experts", str(max(plan["top_k"], 2))]
    _, tcfg = resolve_configs(train_parser().parse_args(flags))
    shared = RunDir(out).data_dir
    prepare_data(shared, tcfg.data, tcfg.vocab_size, tcfg.max_data_bytes)
    for e in plan["experts"]:
        for s in plan["seeds"]:
            run = RunDir(run_dir(out, e, s))
            if holds_run(run.path) and not run.has_checkpoint():
                remove_run(run.path)
            _link_data(shared, run)


def _train_all(plan: dict[str, Any], out: Path, jobs: int, threads: int) -> int:
    """Run the unfinished runs, ``jobs`` at a time; 130 after Ctrl-C (each run checkpoints), 1 on a failure."""
    todo = [(e, s) for s in plan["seeds"] for e in plan["experts"] if not _finished(plan, out, e, s)]
    print(f"sweep: {len(todo)} run(s) to train, {jobs} at a time", file=sys.stderr, flush=True)
    running: dict[subprocess.Popen, tuple[int, int]] = {}
    failed: list[str] = []

    def stop(signum, frame):  # SIGTERM (and SIGINT, also where a shell started us with it ignored)
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while todo or running:
            while todo and len(running) < jobs:
                e, s = todo.pop(0)
                log = open(run_dir(out, e, s).parent / f"seed{s}.log", "ab")  # noqa: SIM115 - closed with the process
                cmd = [sys.executable, "-m", "moekit", "train", *run_argv(plan, out, e, s, threads)]
                running[subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)] = (e, s)
                log.close()
            for proc in [p for p in running if p.poll() is not None]:
                e, s = running.pop(proc)
                status = "done" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
                print(f"sweep: {e} expert(s), seed {s}: {status}", file=sys.stderr, flush=True)
                if proc.returncode != 0:
                    failed.append(f"{run_dir(out, e, s)} (log: {run_dir(out, e, s).parent / f'seed{s}.log'})")
            time.sleep(0.2)
    except KeyboardInterrupt:
        for proc in running:
            proc.send_signal(signal.SIGTERM)  # each run checkpoints and exits
        for proc in running:
            proc.wait()
        print("sweep: interrupted; run the same command again to go on", file=sys.stderr)
        return 130
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    if failed:
        print("moekit sweep: error: runs failed: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


def _params(plan: dict[str, Any], out: Path) -> dict[int, dict[str, int]]:
    from moekit.analysis.report import model_params

    return {e: model_params(json.loads(RunDir(run_dir(out, e, plan["seeds"][0])).config_path.read_text()))
            for e in plan["experts"]}


def _sweep(argv: list[str] | None) -> int:
    args, passed = build_parser().parse_known_args(argv)
    plan = plan_runs(args, [a for a in passed if a != "--"])
    out = args.out
    _load_plan(out, plan)
    _prepare_data(plan, out)
    rc = _train_all(plan, out, args.jobs, args.threads)
    if rc:
        return rc
    from moekit.analysis.sweep import summarize_sweep, write_sweep_report

    runs = {e: {s: run_dir(out, e, s) for s in plan["seeds"]} for e in plan["experts"]}
    summary = summarize_sweep(runs, _params(plan, out), plan["steps"])
    atomic_write_json(out / SWEEP_FILE, summary)
    command = ["moekit", "sweep", *(sys.argv[2:] if argv is None else argv)]
    report = write_sweep_report(summary, runs, out, command)
    for r in summary["runs"]:
        v, sp = r["final_val_loss"], r["speedup"]
        print(f"{'dense' if r['experts'] == 1 else str(r['experts']) + ' experts':>12s}: val {v['mean']:.4f} "
              f"± {v['std']:.4f}, {r['total_params']:,} params ({r['active_params']:,} active), "
              f"{r['tokens_per_s']:,.0f} tok/s" + ("" if sp is None else f", speedup {sp:.2f}x"))
    print(f"sweep: {out / SWEEP_FILE}\nreport: {report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return guarded("moekit sweep", lambda: _sweep(argv))
