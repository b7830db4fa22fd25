"""Workers for routing under data parallelism: the aux-loss-free bias and the router noise."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from moekit.config import ModelConfig, MoEConfig, TrainConfig


def routing_configs(router: str, scope: str | None = None) -> tuple[ModelConfig, TrainConfig]:
    """``scope``: a balance loss (coefficient 0.5) with that balance_scope; None = no balance loss."""
    moe = MoEConfig(d_model=16, d_hidden=24, num_experts=4, top_k=2, router=router,
                    aux_loss_coef=0.0 if scope is None else 0.5, balance_scope=scope or "micro_batch",
                    bias_update_rate=0.05)
    mcfg = ModelConfig(vocab_size=300, d_model=16, n_layers=2, n_heads=2, max_seq_len=64, moe=moe)
    tcfg = TrainConfig(steps=4, batch_size=8, seq_len=16, lr=1e-2, warmup_steps=1, eval_interval=100,
                       eval_batches=1, ckpt_interval=2, vocab_size=300)
    return mcfg, tcfg


def _capture_model(rt) -> dict:
    """Wrap ``rt.setup`` to keep the model the trainer builds."""
    seen: dict = {}
    setup = rt.setup

    def wrapped(model, *args):
        seen["model"] = model
        return setup(model, *args)

    rt.setup = wrapped
    return seen


def _train(rank: int, data, run_dir: Path, router: str, *, steps: int, resume: bool = False,
           schedule_steps: int | None = None, scope: str | None = None) -> dict:
    from moekit.parallel import build_groups
    from moekit.train.distributed import DistributedRuntime
    from moekit.train.loop import train

    mcfg, tcfg = routing_configs(router, scope)
    rt = DistributedRuntime(build_groups(1), run_dir)  # ep 1: data parallel over both ranks
    seen = _capture_model(rt)
    train(mcfg, tcfg.replace(steps=steps, schedule_steps=schedule_steps), rt.own_dir(run_dir), data, resume=resume, runtime=rt,
          label=f"{router}-r{rank}")
    biases = [m.router.expert_bias.clone() for m in seen["model"].moe_layers()] if router == "sigmoid_bias" else []
    metrics = [json.loads(ln) for ln in (rt.own_dir(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {"biases": biases, "losses": {r["step"]: r["loss"] for r in metrics}}


def routing_world2(rank: int, world: int, data, base: str) -> dict:
    from moekit.parallel import build_groups
    from moekit.train.distributed import DistributedRuntime

    base_p = Path(base)
    out = {"bias": _train(rank, data, base_p / "bias", "sigmoid_bias", steps=4)}
    for scope in ("global", "micro_batch"):
        out[f"balance_{scope}"] = _train(rank, data, base_p / f"balance_{scope}", "topk", steps=4, scope=scope)
    out["noise_full"] = _train(rank, data, base_p / "noise_full", "noisy_topk", steps=4)
    _train(rank, data, base_p / "noise_cut", "noisy_topk", steps=2, schedule_steps=4)  # stopped half way
    out["noise_resumed"] = _train(rank, data, base_p / "noise_cut", "noisy_topk", steps=4, resume=True)
    # the noise a rank draws at a step: re-seeded from (seed, step, rank) by the runtime's batch()
    rt = DistributedRuntime(build_groups(1), base_p / "unused")
    rt.seed = 0
    x = torch.zeros(8, 4, dtype=torch.long)
    draws = []
    for step in (1, 1, 2):
        rt.batch(step, x, x)
        draws.append(torch.randn(5))
    out["draws"] = draws
    return out
