"""`moekit train` with options on the existing routers, through the flags generated from MoEConfig."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from moekit.cli.train import main
from moekit.config import ModelConfig


def test_train_with_null_and_zero_compute_experts(tmp_path, flags, metrics):
    run = tmp_path / "run"
    assert main(flags(run, 2, "--eval-interval", "2", "--moe.num-null-experts", "2", "--moe.num-copy-experts", "1",
                      "--moe.num-constant-experts", "1")) == 0
    moe = ModelConfig.from_json(run / "config.json").moe
    assert (moe.num_null_experts, moe.num_copy_experts, moe.num_constant_experts) == (2, 1, 1)
    recs = metrics(run)
    kinds = recs[-1]["tokens_per_kind"]
    # every token's 2 picks land on a routed, null, copy or constant expert
    for layer, counts in kinds.items():
        assert set(counts) == {"null", "copy", "constant"}
        routed = sum(recs[-1]["tokens_per_expert"][layer])
        assert routed + sum(counts.values()) == 2 * 4 * 32  # batch 4 x seq 32 tokens, top-2
    weights = load_file(str(run / "model.safetensors"))
    assert weights["layers.0.ffn.router.extra_weight"].shape == (4, 32)
    assert weights["layers.0.ffn.zero_experts.const_gate"].shape == (1, 2, 32)


def test_train_sigmoid_bias_with_quantile_balancing_and_device_losses(tmp_path, flags, metrics):
    run = tmp_path / "run"
    assert main(flags(run, 3, "--eval-interval", "3", "--router", "sigmoid_bias", "--moe.bias-update", "quantile",
                      "--moe.n-group", "2", "--moe.group-score", "max", "--moe.num-devices", "2",
                      "--moe.device-loss-coef", "0.05", "--moe.comm-loss-coef", "0.05")) == 0
    moe = ModelConfig.from_json(run / "config.json").moe
    assert (moe.bias_update, moe.group_score, moe.num_devices) == ("quantile", "max", 2)
    assert all(json.dumps(r["aux_loss"]) != "NaN" for r in metrics(run))
    bias = load_file(str(run / "model.safetensors"))["layers.0.ffn.router.expert_bias"]
    # quantile balancing leaves centred biases (b -= mean(b)) that moved away from 0
    assert float(bias.abs().sum()) > 0
    torch.testing.assert_close(bias.sum(), torch.tensor(0.0), atol=1e-6, rtol=0)
