"""Spawned-rank workers for training and checkpoints (the layer ones are in _layer_workers.py).

One spawn per world size runs several checks in a row, because starting processes is the slow part.
"""
from __future__ import annotations

import json
from pathlib import Path

import _layer_workers
import torch
import torch.distributed as dist

from moekit import MoEConfig, MoELayer
from moekit.config import ModelConfig, TrainConfig
from moekit.nn.transformer import MoETransformer
from moekit.parallel import shard_moe_layer

CKPT_SEED = 11


def train_configs() -> tuple[ModelConfig, TrainConfig]:
    """A tiny LM; the balance loss is off because its statistics are per rank (documented), z-loss is on."""
    moe = MoEConfig(d_model=16, d_hidden=24, num_experts=4, top_k=2, aux_loss_coef=0.0)
    mcfg = ModelConfig(vocab_size=300, d_model=16, n_layers=2, n_heads=2, max_seq_len=64, moe=moe)
    tcfg = TrainConfig(steps=4, batch_size=8, seq_len=16, lr=1e-2, warmup_steps=1, grad_clip=0.5,
                       eval_interval=4, eval_batches=1, ckpt_interval=100, vocab_size=300)
    return mcfg, tcfg


def ckpt_config() -> ModelConfig:
    moe = MoEConfig(d_model=16, d_hidden=20, num_experts=8, top_k=2, router="sigmoid_bias")
    return ModelConfig(vocab_size=97, d_model=16, n_layers=2, n_heads=2, max_seq_len=32, moe=moe)


def ckpt_reference() -> tuple[MoETransformer, torch.Tensor]:
    """The model saved with ep=4 (built from CKPT_SEED, a non-zero expert bias) and an input batch."""
    torch.manual_seed(CKPT_SEED)
    model = MoETransformer(ckpt_config())
    for m in model.moe_layers():
        m.router.expert_bias.copy_(torch.randn(8) * 0.1)
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(3))
    return model.eval(), ids


def _errors(rank: int, world: int) -> dict[str, str]:
    out = {}
    try:
        shard_moe_layer(MoELayer(MoEConfig(d_model=8, d_hidden=8, num_experts=6, top_k=2)), dist.group.WORLD)
        out["indivisible"] = "no error"
    except ValueError as e:
        out["indivisible"] = str(e)
    cfg = MoEConfig(d_model=8, d_hidden=8, num_experts=4, top_k=1 if rank == 2 else 2)
    try:
        shard_moe_layer(MoELayer(cfg), dist.group.WORLD)
        out["mismatch"] = "no error"
    except RuntimeError as e:
        out["mismatch"] = str(e)
    return out


def world4(rank: int, world: int, data, run_dir: str, ckpt_dir: str) -> dict:
    from moekit.parallel import apply_expert_parallel, build_groups, save_dcp
    from moekit.train.distributed import DistributedRuntime
    from moekit.train.loop import train

    result: dict = {"layers": _layer_workers.layer_parity(rank, world), "errors": _errors(rank, world)}
    # training: ep=2 x dp=2, the global batch split over the 4 ranks
    mcfg, tcfg = train_configs()
    groups = build_groups(2)
    ctx = DistributedRuntime(groups, Path(run_dir))
    my_dir = Path(run_dir) if rank == 0 else Path(run_dir) / "ranks" / f"rank{rank}"
    train(mcfg, tcfg, my_dir, data, runtime=ctx, label=f"ep2dp2-r{rank}")
    result["metrics"] = [json.loads(line) for line in (my_dir / "metrics.jsonl").read_text().splitlines()]
    # a checkpoint saved with ep=4
    g4 = build_groups(4)
    model, _ = ckpt_reference()
    apply_expert_parallel(model, g4.ep_group)
    save_dcp(ckpt_dir, model, groups=g4, extra={"step": torch.tensor(3)}, info={"step": 3})
    return result


def world2(rank: int, world: int, ckpt_dir: str) -> dict:
    from moekit.parallel import apply_expert_parallel, build_groups, load_dcp

    result: dict = {"layers": _layer_workers.layer_parity(rank, world)}
    ref, ids = ckpt_reference()
    ref_logits = ref(ids).logits
    g2 = build_groups(2)
    torch.manual_seed(12345)  # other weights: the load must overwrite every tensor
    model = MoETransformer(ckpt_config())
    apply_expert_parallel(model, g2.ep_group)
    extra = load_dcp(ckpt_dir, model, groups=g2, extra={"step": torch.tensor(0)})
    model.eval()
    L = 8 // 2
    ref_sd = ref.state_dict()
    same = True
    for k, v in model.state_dict().items():
        want = ref_sd[k][rank * L:(rank + 1) * L] if ".experts.w_" in k else ref_sd[k]
        same &= torch.equal(v, want)
    with torch.no_grad():
        logits = model(ids).logits  # both ranks feed the same batch
    result.update(weights_equal=same, step=int(extra["step"]),
                  logits_err=float((logits - ref_logits).abs().max()))
    return result


def dies_early(rank: int, world: int) -> str:
    """Rank 1 exits before the first all-to-all; rank 0 must fail with a clear message, not hang."""
    import os
    import time

    cfg = MoEConfig(d_model=8, d_hidden=8, num_experts=2, top_k=1, router="switch")
    layer = shard_moe_layer(MoELayer(cfg), dist.group.WORLD)
    if rank == 1:
        os._exit(3)
    time.sleep(0.5)
    t0 = time.perf_counter()
    try:
        layer(torch.randn(5, 8))
        layer(torch.randn(5, 8))
    except RuntimeError as e:
        return f"{time.perf_counter() - t0:.1f}s {type(e).__name__}: {e}"
    return "no error"
