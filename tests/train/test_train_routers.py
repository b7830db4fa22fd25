"""`moekit train --router NAME` for the dynamic, balanced and hierarchical routers on the tiny corpus
(two steps each), ReMoE's lambda updated by the trainer once per step and saved with the run, and the
frequency-balanced hash table built from the training data.

Legend: E experts, k top-k.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit.cli.train import main
from moekit.config import ModelConfig
from moekit.data import TokenDataset
from moekit.functional.routing_balanced import balanced_hash_table
from moekit.functional.stats import MoEStats
from moekit.nn.transformer import MoETransformer
from moekit.rundir import RunDir

ROUTER_FLAGS = {
    "top_p": ["--moe.top-p", "0.5", "--moe.entropy-loss-coef", "0.01"],
    "relu": [],
    "hierarchical": ["--moe.num-expert-groups", "2", "--moe.group-top-k", "2", "--top-k", "1"],
    "sinkhorn": [],
    "base": ["--top-k", "1"],
    "hash": ["--top-k", "1", "--moe.hash-balanced"],
    "soft": ["--moe.slots-per-expert", "2"],
}


@pytest.mark.parametrize("router", list(ROUTER_FLAGS))
def test_train_cli_runs_every_new_router(tmp_path, flags, metrics, router):
    out = tmp_path / router
    assert main(flags(out, 2, "--router", router, *ROUTER_FLAGS[router])) == 0
    recs = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in recs)
    ept = recs[-1]["experts_per_token"]["0"]
    if router in ("base", "hash", "sinkhorn", "hierarchical"):  # fixed count: 1, 1, k = 2, 1 x 2 groups
        assert ept == pytest.approx(2.0 if router in ("sinkhorn", "hierarchical") else 1.0)
    else:
        assert 0 < ept <= 4
    model = RunDir(out).load_model()
    assert model.config.moe.router == router
    if router == "base":  # exactly balanced in training
        assert len(set(recs[-1]["tokens_per_expert"]["0"])) == 1


def test_relu_lambda_follows_the_measured_sparsity_and_is_saved(tmp_path, flags, metrics):
    out = tmp_path / "relu"
    assert main(flags(out, 3, "--router", "relu", "--moe.relu-l1-init", "1e-3")) == 0
    recs = [r for r in metrics(out) if "loss" in r]
    lam = torch.tensor(1e-3, dtype=torch.float32)
    for r in recs:  # one step per optimizer step, from the layers' mean sparsity vs 1 - k/E = 0.5
        per_layer = [1 - v / 4 for v in r["experts_per_token"].values()]
        lam = lam * 1.2 if sum(per_layer) / len(per_layer) < 0.5 else lam / 1.2
    model = RunDir(out).load_model()
    for m in model.moe_layers():
        assert m.router.relu_l1.dtype == torch.float32
        torch.testing.assert_close(m.router.relu_l1, lam, rtol=1e-6, atol=0)


def test_update_relu_l1_sequence_averaged_over_layers():
    """Sparsities .3, .3, .9 (the mean of two layers) against target .5: 1e-8 -> 1.2e-8 -> 1.44e-8 -> 1.2e-8."""
    cfg = ModelConfig(vocab_size=32, d_model=8, n_layers=2, n_heads=2, max_seq_len=16,
                      moe={"d_model": 8, "d_hidden": 8, "num_experts": 4, "top_k": 2, "router": "relu"})
    model = MoETransformer(cfg).to(torch.bfloat16)  # lambda stays fp32 whatever the model dtype
    seen = []
    for pair in ((0.2, 0.4), (0.3, 0.3), (0.8, 1.0)):
        zero = torch.zeros(())
        stats = {i: MoEStats(torch.zeros(4, dtype=torch.long), zero.long(), torch.tensor((1 - s) * 4 * 10), 10,
                             zero, zero, zero, zero) for i, s in enumerate(pair)}
        model.update_relu_l1(stats)
        seen.append(float(model.layers[0].ffn.router.relu_l1))
        assert model.layers[1].ffn.router.relu_l1.dtype == torch.float32
    np.testing.assert_allclose(seen, [1.2e-8, 1.44e-8, 1.2e-8], rtol=1e-6)


def test_balanced_hash_table_comes_from_the_training_data(tmp_path, flags):
    out = tmp_path / "hash"
    assert main(flags(out, 1, "--router", "hash", "--top-k", "1", "--moe.hash-balanced")) == 0
    model = RunDir(out).load_model()
    tokens_N = TokenDataset(out / "data" / "train.bin").tokens_N  # the run's tokenised training split
    counts = torch.from_numpy(np.bincount(tokens_N, minlength=model.config.vocab_size))
    for m in model.moe_layers():
        assert torch.equal(m.router.hash_table, balanced_hash_table(counts, 4))
        loads = torch.zeros(4, dtype=torch.long).index_add(0, m.router.hash_table, counts)
        assert float(loads.max() / loads.float().mean()) < 1.05  # balanced on the data it was built from
