"""MoE vs dense at equal active parameters: same data, steps and seed; summary.json and a table."""
from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

from moekit.config import ModelConfig, TrainConfig
from moekit.data import DataInfo
from moekit.rundir import SUMMARY_FILE, RunDir, atomic_write_json
from moekit.train.loop import TrainResult, train
from moekit.train.side_by_side import Job, train_side_by_side

__all__ = ["compare", "dense_baseline", "format_summary", "step_reaching"]


def dense_baseline(cfg: ModelConfig) -> ModelConfig:
    """The dense model with the same active parameters per token: one SwiGLU MLP of width top_k * d_hidden
    (plus the shared experts' width) in every MoE position."""
    return cfg.replace(dense=True, dense_d_hidden=cfg.moe.top_k * cfg.moe.d_hidden + cfg.moe.shared_hidden_total)


def _val_curve(run_dir: Path) -> list[tuple[int, float]]:
    return [(rec["step"], rec["val_loss"]) for rec in RunDir(run_dir).metrics() if "val_loss" in rec]


def _val_by_time(run_dir: Path) -> list[tuple[float, float]]:
    """(training seconds, val loss) of each evaluation; resumed sessions are laid end to end."""
    out, offset, last = [], 0.0, 0.0
    for rec in RunDir(run_dir).metrics():
        t = float(rec.get("elapsed_s", 0.0))
        if t < last:
            offset += last
        last = t
        if "val_loss" in rec:
            out.append((offset + t, rec["val_loss"]))
    return out


def val_at_time(curve: list[tuple[float, float]], t: float) -> float | None:
    """The val loss at training time ``t``, linearly interpolated between evaluations (None before the
    first one); held at the last evaluation after it."""
    if not curve or t < curve[0][0]:
        return None
    for (t0, v0), (t1, v1) in zip(curve, curve[1:]):
        if t0 <= t <= t1:
            return v0 + (v1 - v0) * (t - t0) / (t1 - t0) if t1 > t0 else v1
    return curve[-1][1]


def equal_time_difference(moe_dir: Path, dense_dir: Path) -> dict[str, float] | None:
    """MoE − dense val loss at the same training time: the shorter run's end (the faster model has
    trained more steps by then, the slower fewer)."""
    m, d = _val_by_time(moe_dir), _val_by_time(dense_dir)
    if not m or not d:
        return None
    t = min(m[-1][0], d[-1][0])
    vm, vd = val_at_time(m, t), val_at_time(d, t)
    if vm is None or vd is None:
        return None
    return {"seconds": t, "moe": vm, "dense": vd, "diff": vm - vd}


def step_reaching(curve: list[tuple[int, float]], target: float) -> int | None:
    """First evaluated step whose val loss is <= target (None if never)."""
    return next((s for s, v in curve if v <= target), None)


def _summary(res: TrainResult) -> dict[str, Any]:
    return {"final_val_loss": res.final_val_loss, "tokens_per_s": res.tokens_per_s, "wall_s": res.wall_s,
            "total_params": res.params["total_params"], "active_params": res.params["active_params"]}


def _elapsed_before(run: RunDir) -> float:
    """Seconds the run trained in earlier sessions: its metrics restart ``elapsed_s`` at each resume."""
    if not run.metrics_path.is_file():
        return 0.0
    total, last = 0.0, 0.0
    for rec in run.metrics():
        t = float(rec.get("elapsed_s", 0.0))
        if t < last:
            total += last
        last = t
    return total + last


def _plan(out_dir: Path, cfg: TrainConfig, seeds: int, resume: bool) -> dict[str, Any]:
    """The comparison's plan (seeds, training config) and the rows of its finished runs: compare.json."""
    plan = RunDir(out_dir).compare_plan() if resume else None
    return plan if plan is not None else {"seeds": seeds, "train": cfg.to_dict(), "done": {}}


def compare(model_cfg: ModelConfig, cfg: TrainConfig, out_dir: Path, data: DataInfo, seeds: int = 1, *,
            resume: bool = False, jobs: int = 1) -> dict:
    """Train MoE and dense for each seed; write out_dir/summary.json; return it.

    With one seed the runs are out_dir/moe and out_dir/dense; with several, out_dir/moe/seed{s} etc.
    ``resume`` finishes an interrupted comparison: runs recorded as done in compare.json are kept, an
    interrupted one resumes from its checkpoint, the rest start; the summary equals an uninterrupted one's
    (wall times add up the sessions). ``jobs`` 2: a seed's two runs train at the same time, each in a
    process of its own with ``cfg.threads`` (default: half the cores) intra-op threads
    (:mod:`moekit.train.side_by_side`); 1: one after the other, in this process.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = _plan(out_dir, cfg, seeds, resume)
    RunDir(out_dir).write_compare_plan(plan)
    runs: dict[str, list[dict[str, Any]]] = {"moe": [], "dense": []}
    for i in range(seeds):
        seed = cfg.seed + i
        sides = {"moe": model_cfg, "dense": dense_baseline(model_cfg)}
        key = {name: name if seeds == 1 else f"{name}/seed{seed}" for name in sides}  # run dir under out_dir
        todo = [Job(mcfg, cfg.replace(seed=seed), out_dir / key[name], data,
                    resume and RunDir(out_dir / key[name]).has_checkpoint(), f"{name} seed {seed}")
                for name, mcfg in sides.items() if key[name] not in plan["done"]]
        stopped = None
        for job, res, before in _train_jobs(todo, jobs, cfg.threads):
            if res.interrupted:  # SIGINT/SIGTERM: the run checkpointed; do not start the next one
                stopped = stopped or {"interrupted": True, "run_dir": str(job.run_dir)}
                continue
            plan["done"][str(job.run_dir.relative_to(out_dir))] = _summary(res) | {
                "seed": seed, "run_dir": str(job.run_dir), "wall_s": before + res.wall_s}
            RunDir(out_dir).write_compare_plan(plan)
        if stopped:
            return stopped
        for name in sides:
            runs[name].append(plan["done"][key[name]])
        moe_curve = _val_curve(Path(runs["moe"][-1]["run_dir"]))
        runs["moe"][-1]["step_reaching_dense_final"] = step_reaching(moe_curve, runs["dense"][-1]["final_val_loss"])
        runs["moe"][-1]["equal_time"] = equal_time_difference(Path(runs["moe"][-1]["run_dir"]),
                                                              Path(runs["dense"][-1]["run_dir"]))
    summary = _combine(runs, cfg, seeds, data) | {"jobs": jobs}
    atomic_write_json(out_dir / SUMMARY_FILE, summary)
    return summary


def _train_jobs(todo: list[Job], jobs: int, threads: int | None):
    """(job, TrainResult, seconds trained in earlier sessions) of each job: together when ``jobs`` > 1 and
    there are two, else one after the other (a later one does not start after an interrupted one)."""
    before = [_elapsed_before(RunDir(j.run_dir)) if j.resume else 0.0 for j in todo]
    if jobs > 1 and len(todo) > 1:
        per_job = threads or max(1, (os.cpu_count() or 1) // len(todo))
        yield from zip(todo, train_side_by_side(todo, per_job), before)
        return
    for job, b in zip(todo, before):
        res = train(job.model_cfg, job.cfg, job.run_dir, job.data, resume=job.resume, label=job.label)
        yield job, res, b
        if res.interrupted:
            return


def _combine(runs: dict[str, list[dict[str, Any]]], cfg: TrainConfig, seeds: int, data: DataInfo) -> dict:
    summary: dict[str, Any] = {"steps": cfg.steps, "seeds": [cfg.seed + i for i in range(seeds)],
                               "tokens_per_step": cfg.batch_size * cfg.seq_len,
                               "unigram_entropy": data.unigram_entropy}
    for name, rows in runs.items():
        vals = [r["final_val_loss"] for r in rows]
        summary[name] = {
            "final_val_loss": statistics.fmean(vals),
            "final_val_loss_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in rows),
            "wall_s": statistics.fmean(r["wall_s"] for r in rows),
            "total_params": rows[0]["total_params"],
            "active_params": rows[0]["active_params"],
            "per_seed": rows,
        }
    diffs = [m["final_val_loss"] - d["final_val_loss"] for m, d in zip(runs["moe"], runs["dense"])]
    summary["moe_minus_dense_val_loss"] = {"mean": statistics.fmean(diffs), "per_seed": diffs,
                                           "moe_wins": sum(d < 0 for d in diffs)}
    timed = [r.get("equal_time") for r in runs["moe"]]
    if timed and None not in timed:
        per = [t["diff"] for t in timed]
        summary["moe_minus_dense_val_loss_equal_time"] = {
            "mean": statistics.fmean(per), "per_seed": per, "moe_wins": sum(d < 0 for d in per),
            "seconds": [t["seconds"] for t in timed]}
    return summary


def format_summary(summary: dict) -> str:
    """Side-by-side text table of a comparison summary."""
    m, d = summary["moe"], summary["dense"]
    rows = [
        ("final val loss (mean)", f"{m['final_val_loss']:.4f}", f"{d['final_val_loss']:.4f}"),
        ("tokens/s (median step)", f"{m['tokens_per_s']:,.0f}", f"{d['tokens_per_s']:,.0f}"),
        ("total params", f"{m['total_params']:,}", f"{d['total_params']:,}"),
        ("active params / token", f"{m['active_params']:,}", f"{d['active_params']:,}"),
        ("wall time (s, mean)", f"{m['wall_s']:.0f}", f"{d['wall_s']:.0f}"),
    ]
    lines = [f"{'':26s} {'MoE':>14s} {'dense':>14s}"] + [f"{a:26s} {b:>14s} {c:>14s}" for a, b, c in rows]
    how = "side by side, a process each" if summary.get("jobs", 1) > 1 else "one after the other"
    lines.append(f"MoE / dense tokens/s: {m['tokens_per_s'] / d['tokens_per_s']:.3f} (trained {how})")
    for rm, rd in zip(m["per_seed"], d["per_seed"]):
        reach = rm.get("step_reaching_dense_final")
        lines.append(f"seed {rm['seed']}: val MoE {rm['final_val_loss']:.4f} vs dense {rd['final_val_loss']:.4f}"
                     f" (diff {rm['final_val_loss'] - rd['final_val_loss']:+.4f}); MoE reached dense's final val "
                     + (f"at step {reach} of {summary['steps']}" if reach else "loss: never"))
    diff = summary["moe_minus_dense_val_loss"]
    lines.append(f"MoE - dense val loss at equal steps: mean {diff['mean']:+.4f}; MoE lower in {diff['moe_wins']}/"
                 f"{len(diff['per_seed'])} seed(s)")
    timed = summary.get("moe_minus_dense_val_loss_equal_time")
    if timed:
        lines.append(f"MoE - dense val loss at equal wall time (the shorter run's {statistics.fmean(timed['seconds']):.0f}"
                     f" s): mean {timed['mean']:+.4f}; MoE lower in {timed['moe_wins']}/{len(timed['per_seed'])} seed(s)")
    lines.append(f"Unigram entropy of the corpus: {summary['unigram_entropy']:.3f} nats")
    return "\n".join(lines)
