"""MoE vs dense at equal active parameters: same data, steps and seed; summary.json and a table."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from moekit.config import ModelConfig, TrainConfig
from moekit.data import DataInfo
from moekit.rundir import RunDir, atomic_write_json
from moekit.train.loop import TrainResult, train

__all__ = ["dense_baseline", "compare", "step_reaching", "format_summary"]


def dense_baseline(cfg: ModelConfig) -> ModelConfig:
    """The dense model with the same active parameters per token: one SwiGLU MLP of width top_k * d_hidden
    (plus the shared experts' width) in every MoE position."""
    return cfg.replace(dense=True, dense_d_hidden=cfg.moe.top_k * cfg.moe.d_hidden + cfg.moe.shared_hidden_total)


def _val_curve(run_dir: Path) -> list[tuple[int, float]]:
    return [(rec["step"], rec["val_loss"]) for rec in RunDir(run_dir).metrics() if "val_loss" in rec]


def step_reaching(curve: list[tuple[int, float]], target: float) -> int | None:
    """First evaluated step whose val loss is <= target (None if never)."""
    return next((s for s, v in curve if v <= target), None)


def _summary(res: TrainResult) -> dict[str, Any]:
    return {"final_val_loss": res.final_val_loss, "tokens_per_s": res.tokens_per_s, "wall_s": res.wall_s,
            "total_params": res.params["total_params"], "active_params": res.params["active_params"]}


def compare(model_cfg: ModelConfig, cfg: TrainConfig, out_dir: Path, data: DataInfo, seeds: int = 1) -> dict:
    """Train MoE and dense for each seed; write out_dir/summary.json; return it.

    With one seed the runs are out_dir/moe and out_dir/dense; with several, out_dir/moe/seed{s} etc.
    """
    runs: dict[str, list[dict[str, Any]]] = {"moe": [], "dense": []}
    for i in range(seeds):
        seed = cfg.seed + i
        for name, mcfg in (("moe", model_cfg), ("dense", dense_baseline(model_cfg))):
            run_dir = out_dir / name if seeds == 1 else out_dir / name / f"seed{seed}"
            res = train(mcfg, cfg.replace(seed=seed), run_dir, data, label=f"{name} seed {seed}")
            if res.interrupted:  # SIGINT/SIGTERM: the run checkpointed; do not start the next one
                return {"interrupted": True, "run_dir": str(run_dir)}
            row = _summary(res) | {"seed": seed, "run_dir": str(run_dir)}
            runs[name].append(row)
        moe_curve = _val_curve(Path(runs["moe"][-1]["run_dir"]))
        runs["moe"][-1]["step_reaching_dense_final"] = step_reaching(moe_curve, runs["dense"][-1]["final_val_loss"])
    summary: dict[str, Any] = {"steps": cfg.steps, "seeds": [cfg.seed + i for i in range(seeds)],
                               "tokens_per_step": cfg.batch_size * cfg.seq_len,
                               "unigram_entropy": data.unigram_entropy}
    for name, rows in runs.items():
        summary[name] = {
            "final_val_loss": statistics.fmean(r["final_val_loss"] for r in rows),
            "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in rows),
            "wall_s": statistics.fmean(r["wall_s"] for r in rows),
            "total_params": rows[0]["total_params"],
            "active_params": rows[0]["active_params"],
            "per_seed": rows,
        }
    diffs = [m["final_val_loss"] - d["final_val_loss"] for m, d in zip(runs["moe"], runs["dense"])]
    summary["moe_minus_dense_val_loss"] = {"mean": statistics.fmean(diffs), "per_seed": diffs,
                                           "moe_wins": sum(d < 0 for d in diffs)}
    atomic_write_json(out_dir / "summary.json", summary)
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
    for rm, rd in zip(m["per_seed"], d["per_seed"]):
        reach = rm.get("step_reaching_dense_final")
        lines.append(f"seed {rm['seed']}: val MoE {rm['final_val_loss']:.4f} vs dense {rd['final_val_loss']:.4f}"
                     f" (diff {rm['final_val_loss'] - rd['final_val_loss']:+.4f}); MoE reached dense's final val "
                     + (f"at step {reach} of {summary['steps']}" if reach else "loss: never"))
    diff = summary["moe_minus_dense_val_loss"]
    lines.append(f"MoE - dense val loss: mean {diff['mean']:+.4f}; MoE lower in {diff['moe_wins']}/"
                 f"{len(diff['per_seed'])} seed(s). Unigram entropy of the corpus: {summary['unigram_entropy']:.3f} nats")
    return "\n".join(lines)
