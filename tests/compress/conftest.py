"""Tiny run directories built in-test (no training): a MoE run, a MoE run with shared experts, a dense run.

Each holds config.json, model.safetensors, tokenizer.json and data/{train,val}.bin, like a run of
``moekit train``; weights are the random init with a larger std so routing is far from uniform.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from moekit.config import ModelConfig, MoEConfig
from moekit.data.dataset import write_tokens
from moekit.data.tokenizer import save_tokenizer, train_tokenizer
from moekit.nn.transformer import MoETransformer
from moekit.rundir import RunDir

VOCAB = 300


def text(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    names = ["x", "y", "value", "items", "total", "key", "data", "node"]
    return [f"def f_{rng.choice(names)}({rng.choice(names)}):\n    return {rng.choice(names)} + {rng.randint(0, 99)}\n"
            for _ in range(n)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one CPU thread (the one_thread fixture of tests/conftest.py)."""


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    tok = train_tokenizer(text(400, 0), VOCAB)
    return save_tokenizer(tok, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def tiny_config(**moe) -> ModelConfig:
    base = {"d_model": 32, "d_hidden": 64, "num_experts": 8, "top_k": 2}
    return ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_seq_len=256,
                       moe=MoEConfig(**{**base, **moe}))


def make_run(path: Path, model: MoETransformer, tokenizer_file: Path) -> RunDir:
    from moekit.data.tokenizer import load_tokenizer

    run = RunDir(path)
    run.save_model(model)
    run.copy_tokenizer(tokenizer_file)
    tok = load_tokenizer(tokenizer_file)
    run.data_dir.mkdir(parents=True, exist_ok=True)
    write_tokens(tok, text(300, 1), run.data_dir / "train.bin")
    write_tokens(tok, text(200, 2), run.data_dir / "val.bin")
    return run


def tiny_model(seed: int = 0, **moe) -> MoETransformer:
    torch.manual_seed(seed)
    cfg = tiny_config(**moe)
    model = MoETransformer(cfg.replace(init_std=0.1))
    return model.eval()


@pytest.fixture(scope="session")
def moe_run(tmp_path_factory, tokenizer_file) -> RunDir:
    return make_run(tmp_path_factory.mktemp("moe"), tiny_model(0), tokenizer_file)


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory, tokenizer_file) -> RunDir:
    return make_run(tmp_path_factory.mktemp("shared"), tiny_model(1, num_shared_experts=1), tokenizer_file)


@pytest.fixture(scope="session")
def dense_run(tmp_path_factory, tokenizer_file) -> RunDir:
    torch.manual_seed(2)
    cfg = tiny_config().replace(dense=True, init_std=0.1)
    return make_run(tmp_path_factory.mktemp("dense"), MoETransformer(cfg).eval(), tokenizer_file)
