"""Tiny model configs shared by the model tests (as factory fixtures), and one CPU thread.

One thread: on a shared 2-core box torch's default threading is ~50x slower for these tiny shapes.
"""
from __future__ import annotations

import pytest
import torch

from moekit.config import ModelConfig, MoEConfig
from moekit.nn.transformer import MoETransformer

V, D, H, E, K = 64, 32, 64, 4, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one CPU thread (the one_thread fixture of tests/conftest.py)."""


def _tiny_config(router: str = "topk", *, moe: dict | None = None, **model) -> ModelConfig:
    """V=64, D=32, 2 layers, 2 heads, 4 experts of width 64, top-2 (top-1 for switch)."""
    moe_kw = {"d_model": D, "d_hidden": H, "num_experts": E, "top_k": 1 if router == "switch" else K,
              "router": router}
    moe_kw |= moe or {}
    kw = {"vocab_size": V, "d_model": D, "n_layers": 2, "n_heads": 2, "max_seq_len": 64,
          "moe": MoEConfig(**moe_kw)}
    kw |= model
    return ModelConfig(**kw)


def _tiny_model(router: str = "topk", seed: int = 0, **kw) -> MoETransformer:
    """A randomly initialised tiny model in eval mode. init_std 0.2 (not 0.02) gives the router real
    preferences, so routing decisions are far from ties and outputs far from uniform."""
    torch.manual_seed(seed)
    kw.setdefault("init_std", 0.2)
    return MoETransformer(_tiny_config(router, **kw)).eval()


def _tokens(B: int, S: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tiny_config():
    return _tiny_config


@pytest.fixture
def tiny_model():
    return _tiny_model


@pytest.fixture
def tokens():
    return _tokens
