"""Damaged checkpoints and impossible budgets fail at load with what to fix, never mid-generation."""
from __future__ import annotations

import json
import shutil

import pytest

from moekit.infer.offload import load_offloaded, parse_budget
from moekit.infer.store import StoreError

from .conftest import EXPERT_BYTES, K


def _shard_of(path, tensor: str) -> str:
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][tensor]


@pytest.mark.parametrize("layout", ["hf", "hf_fused"])
def test_truncated_expert_shard_named_at_load(checkpoints, tmp_path, layout):
    src = checkpoints[layout]
    dst = tmp_path / layout
    shutil.copytree(src, dst)
    name = ("model.layers.1.mlp.experts.3.up_proj.weight" if layout == "hf"
            else "model.layers.1.mlp.experts.gate_up_proj")
    shard = dst / _shard_of(dst, name)
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(StoreError) as err:
        load_offloaded(dst, "all")
    msg = str(err.value)
    assert str(shard) in msg and "truncated" in msg and "model.layers.1.mlp.experts." in msg


def test_missing_expert_shard_named_at_load(checkpoints, tmp_path):
    dst = tmp_path / "hf"
    shutil.copytree(checkpoints["hf"], dst)
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    shard = dst / _shard_of(dst, name)
    shard.unlink()
    with pytest.raises(StoreError) as err:
        load_offloaded(dst, "all")
    assert str(shard) in str(err.value) and "missing shard" in str(err.value)
    assert "model.layers.2.mlp.experts." in str(err.value)


def test_truncated_run_directory_named_at_load(checkpoints, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(checkpoints["moekit"], dst)
    weights = dst / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(StoreError) as err:
        load_offloaded(dst, 0)
    assert str(weights) in str(err.value) and "ffn.experts.w_" in str(err.value)


def test_budget_below_topk_refused_with_minimum(checkpoints):
    with pytest.raises(ValueError) as err:
        load_offloaded(checkpoints["moekit"], K * EXPERT_BYTES - 1)
    assert f"at least {K * EXPERT_BYTES} bytes" in str(err.value)
    load_offloaded(checkpoints["moekit"], K * EXPERT_BYTES).close()  # the minimum works


def test_parse_budget():
    assert parse_budget("2GiB") == 2 * 2**30
    assert parse_budget("500MB") == 500 * 10**6
    assert parse_budget("0") == 0 and parse_budget(0) == 0
    assert parse_budget("all") == "all"
    with pytest.raises(ValueError, match="2GiB"):
        parse_budget("lots")
