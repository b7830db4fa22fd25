"""Checkpoint layouts and dtypes: sharded (HF -> moekit and moekit -> HF), transformers' fused expert
tensors, bf16 / fp16 checkpoints and dtype casts, load_any on an HF directory."""

from __future__ import annotations

import json

import pytest
import torch
from _hf_parity import COMMON, TOL, batch, build_hf, hf_logits, max_diff, moekit_logits, transformers
from safetensors.torch import load_file, save_file

from moekit.hf import from_pretrained, load_any, save_pretrained

QWEN2 = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 24,
    "shared_expert_intermediate_size": 40,
    "decoder_sparse_step": 2,
}


def qwen2_config(**kw):
    return transformers.Qwen2MoeConfig(**{**COMMON, **QWEN2, **kw})


def test_sharded_both_ways(tmp_path):
    ref = build_hf(qwen2_config(), tmp_path / "src")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    model = from_pretrained(tmp_path / "sharded")
    ids, mask = batch(ref.config.vocab_size)
    expected = hf_logits(ref, ids, mask)
    assert max_diff(moekit_logits(model, ids, mask), expected, mask) <= TOL
    # moekit writes shards + index too, and transformers reads them
    save_pretrained(model, tmp_path / "ours", max_shard_size="40KB")
    ours = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert set(ours["weight_map"]) == set(index["weight_map"])
    assert len(set(ours["weight_map"].values())) > 3
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert max_diff(hf_logits(back, ids, mask), expected, mask) <= TOL


def _fuse_experts(path, prefix: str, gate: str, up: str, down: str, new_prefix: str) -> None:
    """Rewrite a per-expert checkpoint as transformers >= 5 holds it in memory: experts.gate_up_proj
    (E, 2H, D) and experts.down_proj (E, D, H), under ``new_prefix``."""
    f = path / "model.safetensors"
    sd = load_file(str(f))
    out = {}
    layers = sorted({int(k.split(".")[2]) for k in sd if f".{prefix}experts." in k})
    for i in layers:
        p = f"model.layers.{i}.{prefix}experts."
        E = len({k for k in sd if k.startswith(p) and k.endswith(f".{down}.weight")})
        pop = [sd.pop(f"{p}{e}.{name}.weight") for name in (gate, up, down) for e in range(E)]
        g, u, d = pop[:E], pop[E : 2 * E], pop[2 * E :]
        q = f"model.layers.{i}.{new_prefix}experts."
        out[q + "gate_up_proj"] = torch.stack([torch.cat([g[e], u[e]]) for e in range(E)])
        out[q + "down_proj"] = torch.stack(d)
    for k, v in sd.items():
        out[k.replace(f".{prefix}", f".{new_prefix}")] = v
    save_file(out, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_fused_expert_layout(tmp_path, arch):
    if arch == "mixtral":
        cfg = transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
        names = ("block_sparse_moe.", "w1", "w3", "w2", "mlp.")
    else:
        cfg = transformers.Qwen3MoeConfig(
            **COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24
        )
        names = ("mlp.", "gate_proj", "up_proj", "down_proj", "mlp.")
    ref = build_hf(cfg, tmp_path / "hf")
    _fuse_experts(tmp_path / "hf", *names)
    model = from_pretrained(tmp_path / "hf")
    ids, mask = batch(cfg.vocab_size)
    assert max_diff(moekit_logits(model, ids, mask), hf_logits(ref, ids, mask), mask) <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints(tmp_path, dtype):
    cfg = transformers.DeepseekV3Config(
        **{**COMMON, "num_key_value_heads": 4},
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
    )
    ref = build_hf(cfg, tmp_path / "fp32")
    ref.to(dtype).save_pretrained(tmp_path / "half")
    # 1. loads in the checkpoint's dtype; the router's correction bias stays fp32 as in transformers
    model = from_pretrained(tmp_path / "half")
    assert model.embed.weight.dtype == dtype
    assert model.layers[1].ffn.experts.w_gate.dtype == dtype
    assert model.layers[1].ffn.router.expert_bias.dtype == torch.float32
    ids, mask = batch(cfg.vocab_size)
    with torch.no_grad():
        half_ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "half").eval()
        assert half_ref.model.embed_tokens.weight.dtype == dtype
        scale = hf_logits(half_ref, ids, mask).float().abs().max().item()
        d_half = max_diff(
            moekit_logits(model, ids, mask).float(), hf_logits(half_ref, ids, mask).float(), mask
        )
    assert d_half <= 0.05 * scale, f"{dtype}: {d_half} vs logit scale {scale}"
    # 2. cast on load: the half weights, exactly, in fp32
    up = from_pretrained(tmp_path / "half", dtype="float32")
    assert up.embed.weight.dtype == torch.float32
    ref32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "half", dtype=torch.float32).eval()
    assert max_diff(moekit_logits(up, ids, mask), hf_logits(ref32, ids, mask), mask) <= TOL
    # 3. and down again, from the fp32 checkpoint
    down = from_pretrained(tmp_path / "fp32", dtype=dtype)
    assert down.embed.weight.dtype == dtype
    torch.testing.assert_close(down.embed.weight, model.embed.weight, rtol=0, atol=0)


def test_load_any_hf_dir(tmp_path):
    ref = build_hf(qwen2_config(tie_word_embeddings=True), tmp_path / "hf")
    model, tok = load_any(tmp_path / "hf")
    assert tok is None  # no tokenizer.json in the directory
    assert model.config.tie_embeddings and model.lm_head is None
    ids, mask = batch(ref.config.vocab_size)
    assert max_diff(moekit_logits(model, ids, mask), hf_logits(ref, ids, mask), mask) <= TOL


def test_legacy_hub_config_keys(tmp_path):
    """Hub configs written by transformers 4: rope_theta at the top level, num_experts, torch_dtype."""
    cfg = transformers.Qwen3MoeConfig(
        **{
            **COMMON,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 24,
            "rope_theta": 5e5,
        }
    )
    ref = build_hf(cfg, tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    hub = json.loads(path.read_text())
    assert hub.pop("rope_parameters") == {"rope_theta": 5e5, "rope_type": "default"}
    hub["rope_theta"], hub["rope_scaling"] = 5e5, None
    hub["num_experts"] = hub.pop("num_local_experts")
    hub["torch_dtype"] = hub.pop("dtype")
    path.write_text(json.dumps(hub))
    model = from_pretrained(tmp_path / "hf")
    assert model.config.rope_theta == 5e5 and model.config.moe.num_experts == 4
    ids, mask = batch(cfg.vocab_size)
    assert max_diff(moekit_logits(model, ids, mask), hf_logits(ref, ids, mask), mask) <= TOL
