"""Spawned-rank workers: distributed resume against an uninterrupted run, the meter, setup errors.

One 4-rank spawn (starting processes is the slow part) runs, in order:
1. the setup errors: a batch that does not divide the world, a rank with another config;
2. ``full``: 2N steps at ep=2 x dp=2, recording every rank's routing (router forward hooks);
3. ``half``: the same run stopped after N steps (rank 0 sends itself SIGTERM: the agreed stop);
4. copies of ``half`` resumed for N more steps at ep=4, at ep=1 (dp=4), and at ep=2 with the optimizer
   state *not* loaded (the sensitivity check); each rank snapshots its optimizer state right after load;
5. a copy of ``half``'s checkpoint with one flipped byte, loaded by every rank.
"""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from _run_workers import train_configs

from moekit.config import ModelConfig, TrainConfig

N = 3  # steps before the stop, and after the resume


def resume_configs() -> tuple[ModelConfig, TrainConfig]:
    mcfg, tcfg = train_configs()
    return mcfg, tcfg.replace(steps=2 * N, eval_interval=100, ckpt_interval=100)


def opt_moments(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """parameter name -> {"exp_avg", "exp_avg_sq", "step"} (copies; an FSDP shard gathered to this EP rank's
    whole tensor, collectively, in the optimizer's order, which is the same on every rank)."""
    names = {id(p): n for n, p in model.named_parameters()}

    def full(v: torch.Tensor) -> torch.Tensor:
        return (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()

    return {names[id(p)]: {k: full(v) for k, v in st.items() if isinstance(v, torch.Tensor)}
            for p, st in opt.state.items()}


def snapshot_after_load(rt) -> dict:
    """Wrap ``rt.load_checkpoint`` so that the optimizer state just loaded is kept in the returned dict."""
    seen: dict = {}
    load = rt.load_checkpoint

    def wrapped(run, model, opt, *args):
        state = load(run, model, opt, *args)
        seen["moments"] = opt_moments(model, opt)
        return state

    rt.load_checkpoint = wrapped
    return seen


def record_routing(rt) -> list[torch.Tensor]:
    """Wrap ``rt.setup`` to hook every router: one (E,) count of this rank's picks per training forward."""
    counts: list[torch.Tensor] = []
    setup = rt.setup

    def hook(module, args, routing):
        if module.training:
            E = routing.probs_TE.shape[-1]
            counts.append(torch.bincount(routing.indices_TK.reshape(-1), minlength=E))

    def wrapped(model, model_cfg, cfg):
        setup(model, model_cfg, cfg)
        for layer in model.moe_layers():
            assert layer.cfg.capacity_factor is None  # dropless: every pick travels
            layer.router.register_forward_hook(hook)

    rt.setup = wrapped
    return counts


def _setup_errors(rank: int, mcfg: ModelConfig, tcfg: TrainConfig) -> dict[str, str]:
    from moekit.nn.transformer import MoETransformer
    from moekit.parallel import build_groups
    from moekit.train.distributed import DistributedRuntime

    out = {}
    for name, cfg in {"batch": tcfg.replace(batch_size=6),
                      "config": tcfg.replace(lr=2e-2) if rank == 2 else tcfg}.items():
        rt = DistributedRuntime(build_groups(2), Path("unused"))
        try:
            rt.setup(MoETransformer(mcfg), mcfg, cfg)
            out[name] = "no error"
        except Exception as e:  # noqa: BLE001 - the test reads the type and message
            out[name] = f"{type(e).__name__}: {e}"
    return out


def _train(rank: int, data, run_dir: Path, ep: int, *, resume: bool = False, stop_at: int | None = None,
           routing: bool = False) -> dict:
    from moekit.parallel import build_groups
    from moekit.train.distributed import DistributedRuntime
    from moekit.train.loop import train

    mcfg, tcfg = resume_configs()
    rt = DistributedRuntime(build_groups(ep), run_dir)
    seen = snapshot_after_load(rt) if resume else {}
    counts = record_routing(rt) if routing else None

    def on_step(step: int, rec: dict) -> None:
        if step == stop_at and rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # one rank's signal: every rank must stop at this step

    res = train(mcfg, tcfg, rt.own_dir(run_dir), data, resume=resume, runtime=rt, label=f"{run_dir.name}-r{rank}",
                on_step=on_step)
    out = {"step": res.step, "interrupted": res.interrupted, "ep_rank": rt.groups.ep_rank, "ep_size": ep}
    if resume:
        out["loaded"] = seen["moments"]
    if counts is not None:
        out["routing"] = torch.stack(counts).view(2 * N, -1, counts[0].numel())  # (steps, layers, E)
    return out


def _copy(rank: int, src: Path, dst: Path) -> None:
    if rank == 0:
        shutil.copytree(src, dst)
    dist.barrier()


def resume_world4(rank: int, world: int, data, base: str) -> dict:
    from moekit.nn.transformer import MoETransformer
    from moekit.parallel import apply_expert_parallel, build_groups, load_dcp
    from moekit.rundir import CheckpointError
    from moekit.train import distributed
    from moekit.train.loop import build_optimizer

    base_p = Path(base)
    mcfg, tcfg = resume_configs()
    result: dict = {"errors": _setup_errors(rank, mcfg, tcfg)}
    result["full"] = _train(rank, data, base_p / "full", 2, routing=True)
    result["half"] = _train(rank, data, base_p / "half", 2, stop_at=N)
    for name, ep in (("ep4", 4), ("ep1", 1)):
        _copy(rank, base_p / "half", base_p / name)
        result[name] = _train(rank, data, base_p / name, ep, resume=True)
    # sensitivity: the same resume with the optimizer state left out of the load must train differently
    _copy(rank, base_p / "half", base_p / "no_opt")
    real = distributed.load_dcp
    distributed.load_dcp = lambda path, model, opt=None, groups=None, extra=None, **kw: real(path, model, None,
                                                                                              groups, extra, **kw)
    try:
        result["no_opt"] = _train(rank, data, base_p / "no_opt", 2, resume=True)
    finally:
        distributed.load_dcp = real
    # a flipped byte in one shard: every rank refuses the checkpoint with the same named error
    _copy(rank, base_p / "half" / "dcp", base_p / "corrupt" / "dcp")
    if rank == 0:
        shard = base_p / "corrupt" / "dcp" / "__1_0.distcp"
        raw = bytearray(shard.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        shard.write_bytes(bytes(raw))
    dist.barrier()
    model = MoETransformer(mcfg)
    groups = build_groups(2)
    apply_expert_parallel(model, groups.ep_group)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        load_dcp(base_p / "corrupt" / "dcp", model, build_optimizer(model, tcfg), groups)
        result["corrupt"] = "no error"
    except CheckpointError as e:
        result["corrupt"] = str(e)
    result["corrupt_untouched"] = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    return result
