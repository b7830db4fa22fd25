"""Training throughput of the MoE LM against its dense twin (the same active parameters per token), in one
process (the command line: ``moekit bench train``, moekit.cli.bench_train).

Two runs started minutes apart on a shared machine drift by 10% or more, which is the size of the effect
asked about, so both models are built here (the same data, batch and seed as ``moekit train`` would use)
and their optimizer steps are interleaved: each round runs ``--steps`` real training steps
(:func:`moekit.train.loop.train_step`: batch, forward, backward, clipping, AdamW, routing statistics) of
one model then the other, in alternating order. Per round: each model's median step time and their ratio;
overall: the median ratio and its interquartile range.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

__all__ = ["bench_train", "table"]


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def bench_train(model_cfg, train_cfg, data, work: Path, *, rounds: int = 8, steps: int = 10, warmup: int = 3,
                log=lambda msg: None) -> dict[str, Any]:
    """Interleave the optimizer steps of ``model_cfg`` and its dense twin; the per-round medians and ratios.

    Both start from ``train_cfg.seed`` and step through their own learning-rate schedules from step 1, as
    two fresh ``moekit train`` runs would; the run directories go under ``work``."""
    from moekit.train.compare import dense_baseline
    from moekit.train.loop import open_session, train_step

    cfg = train_cfg.replace(steps=max(train_cfg.steps, warmup + rounds * steps))
    sessions = {name: open_session(m, cfg, work / name, data)
                for name, m in (("moe", model_cfg), ("dense", dense_baseline(model_cfg)))}
    done = dict.fromkeys(sessions, 0)

    def timed(name: str, n: int) -> list[float]:
        s, out = sessions[name], []
        s.model.train()
        for _ in range(n):
            done[name] += 1
            t0 = time.perf_counter()
            train_step(s, done[name])
            out.append(time.perf_counter() - t0)
        return out

    for name in sessions:
        timed(name, warmup)
    tokens = cfg.batch_size * cfg.seq_len
    rows = []
    for r in range(rounds):
        order = ("moe", "dense") if r % 2 == 0 else ("dense", "moe")
        med = {name: statistics.median(timed(name, steps)) for name in order}
        rows.append({"round": r, "order": list(order), "moe_step_s": med["moe"], "dense_step_s": med["dense"],
                     "moe_over_dense_tokens_per_s": med["dense"] / med["moe"]})
        log(f"round {r + 1}/{rounds}: MoE {med['moe'] * 1e3:.1f} ms/step, dense {med['dense'] * 1e3:.1f} ms/step, "
            f"MoE/dense tokens/s {rows[-1]['moe_over_dense_tokens_per_s']:.3f}")
    ratios = [row["moe_over_dense_tokens_per_s"] for row in rows]
    q1, q3 = _quartiles(ratios)
    per_model = {}
    for name, s in sessions.items():
        step_s = statistics.median(row[f"{name}_step_s"] for row in rows)
        per_model[name] = {"tokens_per_s": tokens / step_s, "step_s": step_s, **s.model.num_params()}
    return {"tokens_per_step": tokens, "rounds": rows, "moe": per_model["moe"], "dense": per_model["dense"],
            "moe_over_dense_tokens_per_s": {"median": statistics.median(ratios), "q1": q1, "q3": q3}}


def table(res: dict[str, Any]) -> str:
    m, d, r = res["moe"], res["dense"], res["moe_over_dense_tokens_per_s"]
    lines = [f"{'':24s} {'MoE':>12s} {'dense':>12s}",
             f"{'tokens/s (median round)':24s} {m['tokens_per_s']:12,.0f} {d['tokens_per_s']:12,.0f}",
             f"{'ms per step':24s} {m['step_s'] * 1e3:12.1f} {d['step_s'] * 1e3:12.1f}",
             f"{'total params':24s} {m['total_params']:12,} {d['total_params']:12,}",
             f"{'active params / token':24s} {m['active_params']:12,} {d['active_params']:12,}",
             (f"MoE / dense tokens/s: median {r['median']:.3f} over {len(res['rounds'])} interleaved rounds "
              f"(IQR {r['q1']:.3f}-{r['q3']:.3f}); {res['tokens_per_step']:,} tokens per step")]
    return "\n".join(lines)
