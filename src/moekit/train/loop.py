"""The training loop: AdamW + warmup/cosine, MoE aux losses, eval, atomic checkpoints, exact resume.

Reproducibility contract: a run of 2N steps and a run of N steps resumed for N more give bit-identical
losses on the CPU. Everything random is drawn from state that the checkpoint saves: the data
generator (batch offsets) and torch's global RNG (router noise / jitter).
"""
from __future__ import annotations

import json
import math
import shutil
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from moekit.analysis.collapse import CollapseDetector
from moekit.data import DataInfo, TokenDataset
from moekit.nn.transformer import ModelConfig, MoETransformer
from moekit.train.checkpoint import (CheckpointError, atomic_write_bytes, load_checkpoint, read_manifest,
                                     save_checkpoint)
from moekit.train.config import TrainConfig
from moekit.train.progress import Progress

__all__ = ["TrainResult", "TrainingDiverged", "RoutingCollapsed", "lr_at", "train", "evaluate", "build_optimizer"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class RoutingCollapsed(RuntimeError):
    """--fail-on-collapse and the collapse detector fired."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_loss: float
    final_val_loss: float | None
    tokens_per_s: float
    wall_s: float
    interrupted: bool
    params: dict[str, int]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to lr * min_lr_ratio at cfg.steps."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / max(1, cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; matrices decay, vectors (norms, biases) do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)


@torch.no_grad()
def evaluate(model: MoETransformer, data: TokenDataset, cfg: TrainConfig) -> float:
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


def _step_record(step: int, out, loss: float, lr: float, tokens_per_s: float, elapsed: float,
                 grad_norm: float) -> dict[str, Any]:
    rec: dict[str, Any] = {"step": step, "loss": loss, "aux_loss": float(out.aux_loss.detach()), "lr": lr,
                           "tokens_per_s": tokens_per_s, "elapsed_s": elapsed, "grad_norm": grad_norm}
    if out.stats:
        tpe, drop, bal, z, ent, imb = {}, {}, {}, {}, {}, {}
        for layer, s in out.stats.items():
            counts = s.tokens_per_expert.tolist()
            tpe[str(layer)] = counts
            drop[str(layer)] = float(s.drop_rate)
            bal[str(layer)] = float(s.balance_loss)
            z[str(layer)] = float(s.z_loss)
            ent[str(layer)] = float(s.router_entropy)
            mean = sum(counts) / len(counts)
            imb[str(layer)] = max(counts) / mean if mean > 0 else 0.0
        rec.update(tokens_per_expert=tpe, drop_rate=drop, balance_loss=bal, z_loss=z, router_entropy=ent,
                   max_over_mean_load=imb)
    return rec


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records logged after the checkpoint we resume from (they will be recomputed)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            break  # a torn last line from a killed process
    path.write_text("".join(line + "\n" for line in keep))


def _diverged(run_dir: Path, step: int, what: str) -> TrainingDiverged:
    good = read_manifest(run_dir)["step"] if (run_dir / "trainer_state.json").exists() else None
    return TrainingDiverged(
        f"{what} at step {step}; "
        + (f"the last good checkpoint (step {good}) is kept in {run_dir}; "
           f"resume with a lower --lr: moekit train --resume {run_dir} --lr ..." if good is not None
           else "no checkpoint was written yet; lower --lr or raise --warmup-steps")
    )


def train(model_cfg: ModelConfig, cfg: TrainConfig, run_dir: Path, data: DataInfo, *, resume: bool = False,
          init_state: dict[str, torch.Tensor] | None = None, label: str = "train",
          on_step: Callable[[int, dict], None] | None = None, dist: Any = None) -> TrainResult:
    """Train (or resume) the run in ``run_dir`` up to ``cfg.steps`` total steps.

    ``dist``: a ``moekit.train.distributed.DistributedContext`` for expert/data-parallel runs (issue 7).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = MoETransformer(model_cfg)
    if init_state is not None:
        model.load_state_dict(init_state)
    if dist is not None:  # [issue 7] expert/data parallel: check configs agree, keep this rank's experts
        dist.setup_model(model, model_cfg, cfg)
    opt = build_optimizer(model, cfg)
    # the compiled module shares the model's parameters; checkpoints and the optimizer use the model
    fwd = torch.compile(model) if cfg.compile else model
    gen = torch.Generator().manual_seed(cfg.seed)
    start = 0
    if resume:
        # [issue 7] a distributed run resumes from its DCP checkpoint, resharded to this layout
        state = load_checkpoint(run_dir, model) if dist is None else dist.load_checkpoint(model, opt)
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])
        _truncate_metrics(run_dir / "metrics.jsonl", start)
        # the overrides of this resume (--steps, --lr, ...) are the run's plan now: a later plain --resume
        # must continue it, not fall back to the first invocation's config
        atomic_write_bytes(run_dir / "train_config.json",
                           (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
    else:
        model_cfg.to_json(run_dir / "config.json")
        cfg.to_json(run_dir / "train_config.json")
        (run_dir / "metrics.jsonl").write_text("")
    if not (run_dir / "tokenizer.json").exists() or not resume:
        shutil.copyfile(data.tokenizer_path, run_dir / "tokenizer.json")
    train_data, val_data = data.train_dataset(), data.val_dataset()
    params = model.num_params() if dist is None else dist.num_params(model)  # [issue 7]
    # routing is still settling during warmup: collapse is judged only after it
    detector = CollapseDetector(cfg.dead_threshold, cfg.hot_threshold, cfg.collapse_window, cfg.warmup_steps)

    def checkpoint(step: int) -> None:
        if dist is not None:  # [issue 7] DCP checkpoint holding the global (E, ...) experts, reshardable
            return dist.save_checkpoint(model, opt, gen, step)
        save_checkpoint(run_dir, model, {"optimizer": opt.state_dict(), "data_rng": gen.get_state(),
                                         "torch_rng": torch.get_rng_state()}, step)

    stop = {"signal": None}

    def handler(signum, frame):  # finish the current step, checkpoint, exit
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    model.train()
    tokens_per_step = cfg.batch_size * cfg.seq_len
    metrics = open(run_dir / "metrics.jsonl", "a")
    t_start = time.perf_counter()
    last_loss, val_loss, tps_hist, step = float("nan"), None, [], start
    # [issue 7] only rank 0 shows progress
    progress = Progress(label, cfg.steps, start) if dist is None else dist.progress(label, cfg.steps, start)
    try:
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = train_data.get_batch(cfg.batch_size, cfg.seq_len, gen)
            if dist is not None:  # [issue 7] this rank's rows of the global batch
                x, y = dist.shard_batch(step, x, y)
            out = fwd(x, labels=y)
            total = out.loss + out.aux_loss
            last_loss = float(out.loss.detach())
            if dist is not None:  # [issue 7] the global batch's loss (NaN on every rank if any rank diverged)
                last_loss = dist.mean_loss(out)
            if not math.isfinite(last_loss) or not math.isfinite(float(out.aux_loss.detach())):
                raise _diverged(run_dir, step, f"loss is {last_loss} (aux {float(out.aux_loss.detach())})")
            opt.zero_grad(set_to_none=True)
            total.backward()
            if dist is None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)) \
                    if cfg.grad_clip > 0 else float("nan")
            else:  # [issue 7] reduce gradients and routing counts over ranks; clip by the whole model's norm
                comm = dist.after_backward(model, out)
                grad_norm = dist.clip_grad_norm_(model, cfg.grad_clip)
            # an inf/NaN gradient would make the weights NaN, and a checkpoint of this step would then
            # overwrite the last good one: stop before the update
            if cfg.grad_clip > 0 and not math.isfinite(grad_norm):
                raise _diverged(run_dir, step, f"the gradient norm is {grad_norm} (loss {last_loss})")
            opt.step()
            for block in model.layers:  # aux-loss-free balancing (sigmoid_bias): after the step
                if block.is_moe and block.ffn.router.expert_bias is not None:
                    block.ffn.update_expert_bias(out.stats[block.idx].tokens_per_expert)
            dt = time.perf_counter() - t0
            tps_hist.append(tokens_per_step / dt)
            rec = _step_record(step, out, last_loss, lr, tokens_per_step / dt, time.perf_counter() - t_start,
                               grad_norm)
            if dist is not None:  # [issue 7] all-to-all bytes sent and seconds, this rank's and every rank's
                rec.update(comm)
            events = detector.update(step, rec.get("tokens_per_expert", {}))
            if events:
                rec["collapse"] = events
            if step % cfg.eval_interval == 0 or step == cfg.steps:
                val_loss = evaluate(model, val_data, cfg) if dist is None else \
                    dist.evaluate(model, val_data, cfg)  # [issue 7] eval batches split over the ranks
                rec["val_loss"] = val_loss
            if step % cfg.log_every == 0 or "val_loss" in rec or events:
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
            progress.update(step, rec, val_loss, detector.active)
            if on_step is not None:
                on_step(step, rec)
            if events and cfg.fail_on_collapse:
                checkpoint(step)
                raise RoutingCollapsed(f"routing collapse at step {step}: {events[0]['message']}; "
                                       f"checkpoint saved in {run_dir} (run without --fail-on-collapse to go on)")
            if dist is not None:  # [issue 7] every rank stops (and checkpoints) when any rank got a signal
                stop["signal"] = dist.agree_stop(stop["signal"])
            if step % cfg.ckpt_interval == 0 or step == cfg.steps or stop["signal"] is not None:
                checkpoint(step)
            if stop["signal"] is not None:
                break
    finally:
        metrics.close()
        progress.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    wall = time.perf_counter() - t_start
    steady = tps_hist[len(tps_hist) // 10:]  # skip warm-up steps
    tps = statistics.median(steady) if steady else 0.0
    if stop["signal"] is not None:
        print(f"[{label}] interrupted at step {step}; checkpoint saved, resume with: "
              f"moekit train --resume {run_dir}", file=sys.stderr)
    return TrainResult(run_dir, step, last_loss, val_loss, tps, wall, stop["signal"] is not None, params)


__all__ += ["CheckpointError"]
