"""Expert-parallel x data-parallel training: the :class:`~moekit.train.runtime.Runtime` of several processes.

``moekit.train.loop.train(..., runtime=DistributedRuntime(...))`` calls it where it calls a
``LocalRuntime`` on one process (setup, batch, loss, backward, clipping, eval, checkpoints, stop). Every
collective goes through ``moekit.parallel`` (STYLE: the only package that imports torch.distributed).

Semantics, for a world of N ranks with expert-parallel size ``ep`` (data-parallel size N / ep):
- every rank builds the full model from the same seed, then keeps its E/ep experts of each layer;
- the global batch (``batch_size`` rows) is drawn from the one data generator on every rank, and rank
  r trains on rows [r*B/N, (r+1)*B/N): the union over ranks is the single-process batch;
- parameters and optimizer state are sharded with FSDP2 (parallel/fsdp.py: non-experts over all ranks,
  experts over the dp ranks holding them), gradients reduce-scattered during backward; ``fsdp=False``
  keeps every parameter replicated and all-reduces flattened gradients after backward (parallel/grads.py),
  the fallback for a model with 0-d parameters (FSDP2 shards dim 0) or code that needs full tensors;
- the objective is the mean of the ranks' losses; gradients are clipped by the norm of the whole model's
  gradient;
- routing statistics are per rank (so is the balance loss, computed on each rank's own tokens); the
  counts that are logged and drive the sigmoid_bias update are summed over all ranks, so every rank
  applies the same bias update;
- router noise/jitter draw from torch's RNG re-seeded from (seed, step, rank) at every step, so ranks
  draw independent noise and a resumed run draws the same noise at any world size;
- checkpoints are DCP directories (``<run>/dcp``) holding the global (E, ...) expert tensors: they
  resume with another ``ep``/world size or on one process; ``export_dcp_to_safetensors`` writes the
  single-file model.
"""
from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from moekit.parallel import (
    CommMeter,
    ParallelGroups,
    apply_expert_parallel,
    check_same_config,
    load_dcp,
    read_dcp_info,
    save_dcp,
)
from moekit.parallel import clip_grad_norm_ as _clip_grad_norm
from moekit.parallel import sync_gradients as _sync_gradients
from moekit.parallel.dcp_kept import kept_dcp_dir, kept_dcp_steps, older_hint, promote_dcp
from moekit.parallel.fsdp import FSDPLayout, apply_fsdp, clip_grad_norm_dtensor_, dtype_from_name
from moekit.parallel.groups import all_gather_tensor, all_reduce_, barrier
from moekit.rundir import CheckpointError, RunDir, atomic_write_json
from moekit.train.activations import checkpoint_blocks
from moekit.train.progress import Progress
from moekit.train.runtime import StepReduction

__all__ = ["DistributedRuntime"]

T = TypeVar("T")


class _Quiet:
    """Progress display of the ranks that are not rank 0."""

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class DistributedRuntime:
    """One rank's view of a distributed run; ``groups`` None = one process reading/writing DCP checkpoints."""

    groups: ParallelGroups | None
    run_dir: Path  # the shared run directory (rank 0's): holds the DCP checkpoint
    stop_file: Path | None = None  # rank 0 writes {"step"} there after the checkpoint of an agreed stop
    fsdp: bool = True  # FSDP2 sharding (parallel/fsdp.py); False = replicated + flattened all-reduce
    param_dtype: str | None = None  # FSDP mixed precision: gather/compute dtype (None = the params')
    reduce_dtype: str | None = None  # FSDP mixed precision: gradient reduce dtype (None = param_dtype)
    meter: CommMeter | None = field(default=None, init=False)
    layout: FSDPLayout | None = field(default=None, init=False)
    keep: int = field(default=1, init=False)  # DCP checkpoints kept (TrainConfig.keep_checkpoints, by setup)
    seed: int = field(default=0, init=False)
    stopping: bool = field(default=False, init=False)

    # -- where am I -------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.groups.rank if self.groups is not None else 0

    @property
    def world_size(self) -> int:
        return self.groups.world_size if self.groups is not None else 1

    @property
    def ep_size(self) -> int:
        return self.groups.ep_size if self.groups is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_dir(self) -> Path:
        return RunDir(self.run_dir).dcp_dir

    # -- setup ------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, model_cfg: Any, cfg: Any) -> None:
        """Check that every rank runs the same configs, keep this rank's experts, then shard (FSDP2)."""
        self.seed, self.keep = cfg.seed, cfg.keep_checkpoints
        if cfg.activation_checkpointing:
            checkpoint_blocks(model)
        if self.groups is None:
            if self.param_dtype or self.reduce_dtype:
                raise ValueError("--param-dtype / --reduce-dtype are FSDP's mixed-precision policy: they need "
                                 "a distributed run (--nproc N or torchrun)")
            return
        rows = self.world_size * cfg.grad_accum
        if cfg.batch_size % rows:
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of processes "
                             f"{self.world_size} x grad_accum {cfg.grad_accum} = {rows} (each rank runs "
                             "batch_size / world rows, in grad_accum micro-batches)")
        check_same_config({"model": model_cfg.to_dict(), "train": cfg.to_dict(), "ep": self.ep_size,
                           "fsdp": [self.fsdp, self.param_dtype, self.reduce_dtype]}, "run config")
        if self.ep_size > 1:
            self.meter = apply_expert_parallel(model, self.groups.ep_group)
        if self.fsdp:
            self.layout = apply_fsdp(model, self.groups, param_dtype=dtype_from_name(self.param_dtype),
                                     reduce_dtype=dtype_from_name(self.reduce_dtype))
        elif self.param_dtype or self.reduce_dtype:
            raise ValueError("--param-dtype / --reduce-dtype are FSDP's mixed-precision policy: drop --no-fsdp")

    def progress(self, label: str, total: int, start: int) -> Any:
        return Progress(label, total, start) if self.is_main else _Quiet()

    # -- one step ---------------------------------------------------------------------------------
    def batch(self, step: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the global batch; re-seed torch's RNG for (seed, step, rank); zero the meter."""
        torch.manual_seed((self.seed * 1_000_003 + step * 1_009 + self.rank) % (2**63))
        if self.meter is not None:
            self.meter.reset()
        if self.groups is None:
            return x, y
        b = x.shape[0] // self.world_size
        rows = slice(self.rank * b, (self.rank + 1) * b)
        return x[rows], y[rows]

    def loss(self, out: Any) -> float:
        """The LM loss averaged over ranks (= the global batch's); NaN if any rank's loss or aux is not finite."""
        t = torch.tensor([float(out.loss.detach()), float(out.aux_loss.detach())], dtype=torch.float64)
        if self.groups is not None:
            all_reduce_(t, "loss all-reduce")
            t /= self.world_size
        return float(t[0]) if math.isfinite(float(t[1])) else float("nan")

    def sum_counts(self, counts: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """The step's picks per expert over every rank (each rank routed its own rows of the batch)."""
        if self.groups is None or not counts:
            return counts
        keys = sorted(counts)
        flat = all_reduce_(torch.stack([counts[k].to(torch.float64) for k in keys]), "balance counts all-reduce")
        return {k: flat[i].to(counts[k].dtype) for i, k in enumerate(keys)}

    def reduce(self, model: nn.Module, out: Any) -> StepReduction:
        """Reduce gradients and routing counts over the ranks; return them with this step's all-to-all traffic."""
        if self.groups is None:
            return StepReduction(out.stats, {})
        if self.layout is None:  # FSDP reduce-scattered the gradients during backward already
            _sync_gradients(model, self.groups)
        # counts summed over every rank: logs, collapse detection and the bias update agree everywhere
        layers = sorted(out.stats)
        stats = dict(out.stats)
        if layers:
            parts = [torch.cat([out.stats[i].tokens_per_expert.double().reshape(-1),
                                out.stats[i].dropped.double().reshape(1),
                                out.stats[i].num_assignments.double().reshape(1),
                                torch.tensor([float(out.stats[i].num_tokens)], dtype=torch.float64)]) for i in layers]
            flat = all_reduce_(torch.cat(parts), "routing statistics all-reduce")
            offset = 0
            for i in layers:
                s = out.stats[i]
                E = s.tokens_per_expert.numel()
                stats[i] = replace(s, tokens_per_expert=flat[offset:offset + E].round().to(s.tokens_per_expert.dtype),
                                   dropped=flat[offset + E].round().to(s.dropped.dtype),
                                   num_assignments=flat[offset + E + 1].round().to(s.num_assignments.dtype),
                                   num_tokens=int(flat[offset + E + 2].round()))  # experts_per_token: global
                offset += E + 3
            self._mean_bias_targets(stats, layers)
        return StepReduction(stats, self._comm())

    def _mean_bias_targets(self, stats: dict, layers: list[int]) -> None:
        """Quantile balancing: every rank steps its biases to the ranks' mean target, so they stay equal."""
        targets = [i for i in layers if stats[i].bias_target is not None]
        if not targets:
            return
        mean = all_reduce_(torch.stack([stats[i].bias_target.double() for i in targets]),
                           "bias target all-reduce") / self.world_size
        for row, i in enumerate(targets):
            stats[i] = replace(stats[i], bias_target=mean[row].to(stats[i].bias_target.dtype))

    def _comm(self) -> dict[str, Any]:
        if self.meter is None:
            return {}
        c = self.meter.reset()
        mine = torch.tensor([c["a2a_bytes_sent"], c["a2a_seconds"]], dtype=torch.float64)
        every = all_gather_tensor(mine, "all-to-all statistics all-gather")
        return {"a2a_bytes_sent": int(c["a2a_bytes_sent"]), "a2a_s": c["a2a_seconds"],
                "a2a_bytes_sent_per_rank": [int(v) for v in every[:, 0].tolist()],
                "a2a_s_per_rank": every[:, 1].tolist()}

    def grad_norm_(self, model: nn.Module, max_norm: float) -> float:
        # max_norm = inf computes the norm and scales by exactly 1: a non-finite gradient is seen either way
        max_norm = max_norm if max_norm > 0 else math.inf
        if self.layout is not None:
            return clip_grad_norm_dtensor_([p for p in model.parameters() if p.requires_grad], max_norm)
        return _clip_grad_norm(model, max_norm, self.groups)

    def agree_stop(self, sig: int | None) -> int | None:
        """Stop (checkpoint and exit) on every rank when any rank got SIGINT/SIGTERM."""
        if self.groups is None:
            return sig
        t = torch.tensor([0.0 if sig is None else 1.0])
        all_reduce_(t, "stop-flag all-reduce")
        agreed = sig if sig is not None else (signal.SIGTERM if t.item() > 0 else None)
        self.stopping = agreed is not None
        return agreed

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Any, cfg: Any) -> float:
        """Token-weighted mean validation loss; every eval batch is split over the ranks."""
        was_training = model.training
        model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for x, y in data.iter_eval_batches(cfg.batch_size, cfg.seq_len, cfg.eval_batches):
            x, y = torch.tensor_split(x, self.world_size)[self.rank], torch.tensor_split(y, self.world_size)[self.rank]
            out = model(x, labels=y)  # every rank runs the forward, even on 0 rows: the all-to-alls need it
            if y.numel():
                total += torch.tensor([float(out.loss) * y.numel(), y.numel()], dtype=torch.float64)
        if self.groups is not None:
            all_reduce_(total, "eval all-reduce")
        model.train(was_training)
        return float(total[0] / total[1].clamp_min(1))

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, run: RunDir, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                        step: int) -> None:
        save_dcp(self.ckpt_dir, model, opt, self.groups,
                 extra={"step": torch.tensor(step, dtype=torch.int64), "data_rng": gen.get_state()},
                 info={"step": step}, fsdp=self.layout, keep=self.keep)
        if self.stopping and self.stop_file is not None:  # the collective save is done on every rank
            atomic_write_json(self.stop_file, {"step": step, "checkpoint": str(self.ckpt_dir)})

    def load_checkpoint(self, run: RunDir, model: nn.Module, opt: torch.optim.Optimizer,
                        step: int | None = None) -> dict[str, Any]:
        """Load (resharding experts to this layout); return the state the loop restores."""
        src = self.ckpt_dir if step is None else kept_dcp_dir(self.ckpt_dir, step)
        if step is not None and not (src / ".metadata").is_file():
            kept = kept_dcp_steps(self.ckpt_dir)
            raise ValueError(f"--from-step {step}: no kept distributed checkpoint of that step in {src.parent} "
                             f"(kept steps: {kept or 'none'}; --keep-checkpoints sets how many are kept)")
        templates = {"step": torch.tensor(0, dtype=torch.int64), "data_rng": torch.Generator().get_state()}
        try:
            extra = load_dcp(src, model, opt, self.groups, extra=templates, fsdp=self.layout)
        except CheckpointError as e:
            raise CheckpointError(f"{e}{older_hint(self.ckpt_dir, self.run_dir) if step is None else ''}") from e
        if step is not None:  # the kept checkpoint becomes the latest; the newer ones are moved aside
            self._on_rank0_alone(lambda: promote_dcp(self.ckpt_dir, step), "promoting the kept checkpoint")
        return {"data_rng": extra["data_rng"], "torch_rng": torch.get_rng_state(), "step": int(extra["step"])}

    def last_checkpoint_step(self, run: RunDir) -> int | None:
        return read_dcp_info(self.ckpt_dir).get("step")

    def own_dir(self, run_dir: Path) -> Path:
        return RunDir(run_dir).rank_dir(self.rank).path

    def _on_rank0_alone(self, fn: Callable[[], Any], what: str) -> None:
        """Rank 0 runs ``fn`` while every other rank waits, after all are done with what came before."""
        if self.groups is not None:
            barrier(what)
        if self.is_main:
            fn()
        if self.groups is not None:
            barrier(what)

    def rank0_first(self, fn: Callable[[], T]) -> T:
        if self.groups is None:
            return fn()
        if self.is_main:
            result = fn()
            barrier("waiting for rank 0 to prepare the data")
            return result
        barrier("waiting for rank 0 to prepare the data")
        return fn()
