"""Spawned-rank workers for FSDP2 + EP: one 4-rank spawn runs, in order,

1. named layout errors (ep not dividing the world);
2. ``accum``: ep=2 x dp=2 FSDP2 (20 steps) with grad_accum=2 and activation checkpointing, the DCP checkpoint kept;
3. ``fallback``: the same without FSDP (replicated, flattened all-reduce) and without accumulation;
4. ``mixed``: FSDP with param_dtype bfloat16, reduce_dtype float32;
5. bytes of parameters + optimizer state per rank, FSDP vs replicated;
6. ``accum``'s checkpoint loaded at ep=4 x dp=1 and ep=1 x dp=4 (model and optimizer), each rank
   returning its EP rank's experts and the non-expert tensors gathered whole.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from _run_workers import train_configs

STEPS = 20


def fsdp_configs():
    mcfg, tcfg = train_configs()
    return mcfg, tcfg.replace(steps=STEPS, eval_interval=STEPS)


def _metrics(rank: int, run_dir: Path) -> list[dict]:
    d = run_dir if rank == 0 else run_dir / "ranks" / f"rank{rank}"
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


def _train(rank: int, data, run_dir: Path, ep: int, **rt_kw) -> list[dict]:
    from moekit.parallel import build_groups
    from moekit.train.distributed import DistributedRuntime
    from moekit.train.loop import train

    mcfg, tcfg = fsdp_configs()
    tcfg = tcfg.replace(**rt_kw.pop("train", {}))
    rt = DistributedRuntime(build_groups(ep), run_dir, **rt_kw)
    train(mcfg, tcfg, rt.own_dir(run_dir), data, runtime=rt, label=f"{run_dir.name}-r{rank}")
    return _metrics(rank, run_dir)


def _bytes(ep: int, fsdp: bool) -> dict[str, int]:
    from moekit.nn.transformer import MoETransformer
    from moekit.parallel import build_groups
    from moekit.parallel.checkpoint import _init_adam_state
    from moekit.parallel.fsdp import local_bytes
    from moekit.train.distributed import DistributedRuntime
    from moekit.train.loop import build_optimizer

    mcfg, tcfg = fsdp_configs()
    model = MoETransformer(mcfg)
    DistributedRuntime(build_groups(ep), Path("unused"), fsdp=fsdp).setup(model, mcfg, tcfg)
    opt = build_optimizer(model, tcfg)
    _init_adam_state(opt)  # the state AdamW holds from its first step on
    return local_bytes(model, opt)


def _gathered(model, opt) -> dict[str, torch.Tensor]:
    """name -> this EP rank's whole tensor (experts: its L experts), optimizer moments as name.exp_avg..."""
    def full(v):
        return (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()

    out = {k: full(v) for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            out[f"{names[id(p)]}.{k}"] = full(st[k])
    return out


def _load(run_dir: Path, ep: int) -> dict:
    from moekit.nn.transformer import MoETransformer
    from moekit.parallel import build_groups
    from moekit.rundir import RunDir
    from moekit.train.distributed import DistributedRuntime
    from moekit.train.loop import build_optimizer

    mcfg, tcfg = fsdp_configs()
    torch.manual_seed(999)  # other weights: the load must overwrite every tensor
    model = MoETransformer(mcfg)
    rt = DistributedRuntime(build_groups(ep), run_dir)
    rt.setup(model, mcfg, tcfg)
    opt = build_optimizer(model, tcfg)
    state = rt.load_checkpoint(RunDir(run_dir), model, opt)
    return {"ep_rank": rt.groups.ep_rank, "step": state["step"], "tensors": _gathered(model, opt)}


def fsdp_world4(rank: int, world: int, data, base: str) -> dict:
    from moekit.parallel import build_groups

    base_p = Path(base)
    out: dict = {}
    try:
        build_groups(3)
        out["ep3"] = "no error"
    except ValueError as e:
        out["ep3"] = str(e)
    out["accum"] = _train(rank, data, base_p / "accum", 2,
                          train={"grad_accum": 2, "activation_checkpointing": True})
    out["fallback"] = _train(rank, data, base_p / "fallback", 2, fsdp=False)
    out["mixed"] = _train(rank, data, base_p / "mixed", 2, param_dtype="bfloat16", reduce_dtype="float32")
    out["bytes"] = {"fsdp": _bytes(2, True), "replicated": _bytes(2, False)}
    out["load"] = {name: _load(base_p / "accum", ep) for name, ep in (("ep4dp1", 4), ("ep1dp4", 1))}
    return out
