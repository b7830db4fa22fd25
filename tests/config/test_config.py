"""moekit.config: the shared dict/JSON round trip and its errors, field metadata, and the package's imports
(nothing of moekit outside it, no torch)."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import moekit.config as config_pkg
from moekit.config import (
    MLAConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    TrainConfig,
    config_fields,
    training_only_fields,
)

CONFIGS = [
    ModelConfig(d_model=32, n_heads=2, moe={"d_model": 32, "d_hidden": 16, "num_experts": 4},
                mla={"q_lora_rank": None, "kv_lora_rank": 8}, dense_layers=[0]),
    MoEConfig(d_model=8, d_hidden=4, router="sigmoid_bias", capacity_factor=1.25),
    MLAConfig(q_lora_rank=None),
    TrainConfig(steps=3, data="x.txt", threads=2),
    ParallelConfig(ep=2, nproc=4, dist_timeout=30.0),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_dict_and_json_round_trip(cfg, tmp_path):
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    cfg.to_json(tmp_path / "c.json")
    assert type(cfg).from_json(tmp_path / "c.json") == cfg
    assert cfg.replace() == cfg


def test_model_config_keeps_its_model_type_and_nested_configs():
    d = CONFIGS[0].to_dict()
    assert d["model_type"] == "moekit" and isinstance(d["moe"], dict) and isinstance(d["mla"], dict)
    back = ModelConfig.from_dict(d)
    assert isinstance(back.moe, MoEConfig) and isinstance(back.mla, MLAConfig) and back.dense_layers == (0,)


@pytest.mark.parametrize("cls, kind", [(ModelConfig, "model"), (TrainConfig, "training"),
                                       (MoEConfig, "MoE"), (ParallelConfig, "parallel"), (MLAConfig, "MLA")])
def test_errors_name_the_config(cls, kind, tmp_path):
    with pytest.raises(ValueError, match=rf"{cls.__name__} has no field\(s\) \['bogus'\]; known fields: \["):
        cls.from_dict({"bogus": 1})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=rf"bad.json: not valid JSON \(.*\); the {kind} config is damaged"):
        cls.from_json(bad)


@pytest.mark.parametrize("kw, msg", [
    ({"ep": 0}, "ep=0 must be an integer >= 1"),
    ({"nproc": 0}, r"nproc=0 must be an integer >= 1 \(or None = not launched by moekit\)"),
    ({"dist_timeout": 0.0}, r"dist_timeout=0.0 must be > 0 \(seconds\)"),
])
def test_parallel_config_is_validated(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ParallelConfig(**kw)


def test_training_only_fields_are_marked_once():
    assert training_only_fields(ModelConfig) == {
        "init_std", "max_seq_len", "moe.aux_loss_coef", "moe.z_loss_coef", "moe.importance_loss_coef",
        "moe.capacity_factor", "moe.drop_policy", "moe.seq_aux", "moe.bias_update_rate", "moe.router_jitter",
        "moe.expert_impl",
        "moe.bias_update", "moe.device_loss_coef", "moe.comm_loss_coef", "moe.balance_scope",  # options on the existing routers
        "moe.entropy_loss_coef", "moe.relu_l1_init", "moe.relu_l1_multiplier", "moe.sinkhorn_max_iter",
        "moe.sinkhorn_tol", "moe.hash_balanced",  # the dynamic, balanced and hierarchical routers
    }
    assert training_only_fields(TrainConfig) == set()


@pytest.mark.parametrize("cls", [ModelConfig, MoEConfig, MLAConfig, TrainConfig, ParallelConfig])
def test_every_field_has_help(cls):
    assert [f.name for f, _ in config_fields(cls) if not f.metadata.get("help")] == []
    for f, _ in config_fields(cls):
        choices = f.metadata.get("choices")
        if choices and f.default is not dataclasses.MISSING:
            assert f.default in choices


def test_config_imports_nothing_of_moekit_and_no_torch():
    for path in Path(config_pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith("torch"), f"{path.name} imports {name}"
                assert not name.startswith("moekit") or name.startswith("moekit.config"), f"{path.name}: {name}"
