"""--grad-accum N equals one batch of N x the rows; --activation-checkpointing changes memory, not losses."""
from __future__ import annotations

import json
import math

import pytest
import torch

from moekit import MoEConfig
from moekit.config import ModelConfig, TrainConfig
from moekit.nn.transformer import MoETransformer
from moekit.rundir import load_weights
from moekit.train.accumulate import merge_stats
from moekit.train.activations import checkpoint_blocks, saved_activation_bytes
from moekit.train.loop import train


def _configs(router: str = "topk") -> tuple[ModelConfig, TrainConfig]:
    # the balance loss is a product of batch means, so it is per micro-batch (documented): off here
    moe = MoEConfig(d_model=32, d_hidden=48, num_experts=4, top_k=2, aux_loss_coef=0.0, router=router)
    mcfg = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, moe=moe)
    tcfg = TrainConfig(steps=6, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=1, grad_clip=0.5,
                       eval_interval=6, eval_batches=1, ckpt_interval=100, vocab_size=300)
    return mcfg, tcfg


@pytest.fixture(scope="module")
def data(corpus, tmp_path_factory):
    from moekit.data import prepare_data

    return prepare_data(tmp_path_factory.mktemp("data"), str(corpus), 300, 100_000)


def _run(tmp_path, data, name: str, router: str = "topk", **train_changes) -> tuple[list[dict], MoETransformer]:
    mcfg, tcfg = _configs(router)
    out = tmp_path / name
    train(mcfg, tcfg.replace(**train_changes), out, data, label=name)
    model = MoETransformer(mcfg)
    load_weights(model, out / "model.safetensors")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], model


@pytest.mark.parametrize("router", ["topk", "sigmoid_bias"])
def test_grad_accum_and_checkpointing_match_one_batch(tmp_path, data, router) -> None:
    ref, ref_model = _run(tmp_path, data, "ref", router)
    for name, changes in {"accum2": {"grad_accum": 2}, "accum4_ckpt": {"grad_accum": 4,
                                                                       "activation_checkpointing": True}}.items():
        got, model = _run(tmp_path, data, name, router, **changes)
        for a, b in zip(got, ref, strict=True):
            assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (name, a["step"], a["loss"], b["loss"])
            assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4), (name, a["step"])
            # counts of the micro-batches summed: the batch's (and the sigmoid_bias update is the batch's)
            assert a["tokens_per_expert"] == b["tokens_per_expert"], (name, a["step"])
        assert math.isclose(got[-1]["val_loss"], ref[-1]["val_loss"], rel_tol=1e-5)
        for (k, v), w in zip(model.state_dict().items(), ref_model.state_dict().values()):
            assert float((v - w).abs().max()) < 5e-5, (name, k)
    ckpt, _ = _run(tmp_path, data, "ckpt", router, activation_checkpointing=True)
    # the recompute replays the same ops: identical losses, not merely close
    assert [r["loss"] for r in ckpt] == [r["loss"] for r in ref]


def test_checkpointing_keeps_less_for_backward() -> None:
    mcfg, _ = _configs()
    mcfg = mcfg.replace(n_layers=4)
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    sizes, grads = {}, {}
    for mode in ("plain", "checkpointed"):
        torch.manual_seed(0)
        model = MoETransformer(mcfg)
        if mode == "checkpointed":
            assert checkpoint_blocks(model) == 4 and checkpoint_blocks(model) == 0  # idempotent
        with saved_activation_bytes() as saved:
            out = model(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
        sizes[mode] = saved.bytes
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    assert sizes["checkpointed"] < sizes["plain"] / 3, sizes
    for a, b in zip(grads["plain"], grads["checkpointed"]):
        assert torch.equal(a, b)


def test_merge_stats_sums_counts_and_averages_means() -> None:
    from moekit.nn.moe import MoELayer

    torch.manual_seed(0)
    m = MoELayer(MoEConfig(d_model=8, d_hidden=8, num_experts=4, top_k=2))
    x = torch.randn(10, 8)
    whole, a, b = m(x).stats, m(x[:5]).stats, m(x[5:]).stats
    merged = merge_stats([{0: a}, {0: b}])[0]
    assert torch.equal(merged.tokens_per_expert, whole.tokens_per_expert)
    assert merged.num_tokens == whole.num_tokens == 10
    torch.testing.assert_close(merged.z_loss, whole.z_loss)  # equal halves: the mean of means
