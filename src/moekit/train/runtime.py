"""Where a training run executes: the loop calls its ``Runtime`` at the same points whatever the layout.

``LocalRuntime`` is one process; ``moekit.train.distributed.DistributedRuntime`` is expert parallel x
data parallel over ``torch.distributed`` (and reads / writes distributed checkpoints). The loop holds
no ``if distributed`` branch: each difference is a method here.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from moekit.config import ModelConfig, TrainConfig
from moekit.data import TokenDataset
from moekit.functional.stats import MoEStats
from moekit.rundir import RunDir
from moekit.train.activations import checkpoint_blocks
from moekit.train.progress import Progress

__all__ = ["LocalRuntime", "Runtime", "StepReduction", "evaluate"]

T = TypeVar("T")


@dataclass(frozen=True)
class StepReduction:
    """A step's routing statistics as every rank should see them, and its communication figures."""

    stats: dict[int, MoEStats]  # layer -> stats (counts summed over ranks in a distributed run)
    comm: dict[str, Any]  # extra metrics of the step (all-to-all bytes and seconds), {} on one process


class Runtime(Protocol):
    rank: int
    is_main: bool

    def setup(self, model: nn.Module, model_cfg: ModelConfig, cfg: TrainConfig) -> None:
        """Check the run can go ahead here, then lay the built model out (e.g. keep this rank's experts)."""

    def progress(self, label: str, total: int, start: int) -> Any: ...

    def batch(self, step: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's rows of the global batch of ``step``."""

    def loss(self, out: Any) -> float:
        """The global batch's LM loss; NaN when any part of the objective (also aux) is not finite."""

    def reduce(self, model: nn.Module, out: Any) -> StepReduction:
        """After backward: reduce gradients for the global objective; the statistics every rank agrees on.

        ``out.stats``: this process's routing statistics of the step (merged over its micro-batches)."""

    def sum_counts(self, counts: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Per-layer expert counts summed over every process (balance_scope="global")."""

    def grad_norm_(self, model: nn.Module, max_norm: float) -> float:
        """The whole model's gradient norm, always computed; gradients clipped to ``max_norm`` when > 0."""

    def agree_stop(self, sig: int | None) -> int | None:
        """Stop on every process when any process got SIGINT/SIGTERM."""

    def evaluate(self, model: nn.Module, data: TokenDataset, cfg: TrainConfig) -> float: ...

    def save_checkpoint(self, run: RunDir, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                        step: int) -> None: ...

    def load_checkpoint(self, run: RunDir, model: nn.Module, opt: torch.optim.Optimizer,
                        step: int | None = None) -> dict[str, Any]:
        """Load model and optimizer from the latest checkpoint (or the kept one of ``step``); return
        ``{"data_rng", "torch_rng", "step"}``."""

    def last_checkpoint_step(self, run: RunDir) -> int | None: ...

    def own_dir(self, run_dir: Path) -> Path:
        """Where this process writes: the run directory (rank 0), or its own ranks/rank<r> under it."""

    def rank0_first(self, fn: Callable[[], T]) -> T:
        """Rank 0 runs ``fn`` (e.g. building the token files) before the other processes reuse its result."""


@torch.no_grad()
def evaluate(model: nn.Module, data: TokenDataset, cfg: TrainConfig) -> float:
    """Token-weighted mean LM loss over fixed validation windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in data.iter_eval_batches(cfg.batch_size, cfg.seq_len, cfg.eval_batches):
        out = model(x, labels=y)
        total += float(out.loss) * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / max(1, count)


class LocalRuntime:
    """One process: the whole batch, plain gradients, safetensors checkpoints in the run directory."""

    rank = 0
    is_main = True
    keep = 2  # checkpoints kept on disk (TrainConfig.keep_checkpoints, set by setup)

    def setup(self, model: nn.Module, model_cfg: ModelConfig, cfg: TrainConfig) -> None:
        self.keep = cfg.keep_checkpoints
        if cfg.activation_checkpointing:
            checkpoint_blocks(model)

    def progress(self, label: str, total: int, start: int) -> Progress:
        return Progress(label, total, start)

    def batch(self, step: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def loss(self, out: Any) -> float:
        loss = float(out.loss.detach())
        return loss if math.isfinite(float(out.aux_loss.detach())) else float("nan")

    def reduce(self, model: nn.Module, out: Any) -> StepReduction:
        return StepReduction(out.stats, {})

    def sum_counts(self, counts: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return counts

    def grad_norm_(self, model: nn.Module, max_norm: float) -> float:
        # max_norm = inf computes the norm and scales by exactly 1: a non-finite gradient is seen either way
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf))

    def agree_stop(self, sig: int | None) -> int | None:
        return sig

    def evaluate(self, model: nn.Module, data: TokenDataset, cfg: TrainConfig) -> float:
        return evaluate(model, data, cfg)

    def save_checkpoint(self, run: RunDir, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                        step: int) -> None:
        run.save_checkpoint(model, {"optimizer": opt.state_dict(), "data_rng": gen.get_state(),
                                    "torch_rng": torch.get_rng_state()}, step, self.keep)

    def load_checkpoint(self, run: RunDir, model: nn.Module, opt: torch.optim.Optimizer,
                        step: int | None = None) -> dict[str, Any]:
        state = run.load_checkpoint(model, step)
        opt.load_state_dict(state["optimizer"])
        if step is not None:  # the kept checkpoint becomes the latest; the newer ones are moved aside
            run.promote_checkpoint(step)
        return state

    def last_checkpoint_step(self, run: RunDir) -> int | None:
        return run.read_manifest()["step"] if run.has_checkpoint() else None

    def own_dir(self, run_dir: Path) -> Path:
        return run_dir

    def rank0_first(self, fn: Callable[[], T]) -> T:
        return fn()
