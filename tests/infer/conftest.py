"""Tiny checkpoints in every layout the expert store reads, and the resident reference for each.

Layouts: a moekit run directory (one model.safetensors), the same weights as HF shards with one tensor
per expert (``moekit.hf.save_pretrained``, tiny shard size), and HF shards with fused 3-D expert tensors
(``experts.gate_up_proj`` (E, 2H, D), ``experts.down_proj`` (E, D, H)), read by slice.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moekit.config import ModelConfig, MoEConfig
from moekit.hf import save_pretrained
from moekit.nn.transformer import MoETransformer
from moekit.rundir import RunDir

V, D, H, E, K, LAYERS = 96, 32, 64, 8, 2, 3
EXPERT_BYTES = 3 * H * D * 4  # one fp32 swiglu expert


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one CPU thread (the one_thread fixture of tests/conftest.py)."""


def tiny_model(seed: int = 0, **moe) -> MoETransformer:
    """OLMoE-like (qk_norm over the whole projection, softmax top-2 of 8) so the HF layouts can express it;
    init_std 0.2 so routing is far from ties."""
    torch.manual_seed(seed)
    m = MoEConfig(d_model=D, d_hidden=H, num_experts=E, top_k=K, router="topk", norm_topk=False, **moe)
    cfg = ModelConfig(vocab_size=V, d_model=D, n_layers=LAYERS, n_heads=2, max_seq_len=64, init_std=0.2,
                      qk_norm=True, qk_norm_scope="full", moe=m)
    return MoETransformer(cfg).eval()


def _fuse(per_expert: Path, out: Path) -> None:
    """Rewrite a per-expert HF checkpoint with fused (E, 2H, D) / (E, D, H) expert tensors, sharded by layer."""
    out.mkdir()
    index = json.loads((per_expert / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for file in sorted(set(index.values())):
        with safe_open(str(per_expert / file), "pt") as f:
            tensors |= {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for i in range(LAYERS):
        p = f"model.layers.{i}.mlp.experts."
        g = [tensors.pop(f"{p}{e}.gate_proj.weight") for e in range(E)]
        u = [tensors.pop(f"{p}{e}.up_proj.weight") for e in range(E)]
        d = [tensors.pop(f"{p}{e}.down_proj.weight") for e in range(E)]
        shards[f"layer{i}.safetensors"] = {p + "gate_up_proj": torch.stack([torch.cat([a, b]) for a, b in zip(g, u)]),
                                           p + "down_proj": torch.stack(d)}
    shards["rest.safetensors"] = tensors
    weight_map = {}
    for name, ts in shards.items():
        save_file(ts, str(out / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(ts, name)
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (out / "config.json").write_text((per_expert / "config.json").read_text())


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """layout name -> directory, all holding the weights of ``tiny_model(0)``."""
    root = tmp_path_factory.mktemp("ckpt")
    model = tiny_model(0)
    RunDir(root / "moekit").save_model(model)
    save_pretrained(model, root / "hf", max_shard_size="40KB")
    _fuse(root / "hf", root / "hf_fused")
    return {"moekit": root / "moekit", "hf": root / "hf", "hf_fused": root / "hf_fused"}


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded prompts (ids, attention mask)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    return ids, mask
