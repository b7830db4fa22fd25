"""gpt-oss MXFP4 experts: a checkpoint in the published layout (``*_blocks`` + ``*_scales``,
``quantization_config.quant_method: mxfp4``) loads with logits equal to transformers' model holding the
experts dequantized by transformers' own function, generates the same tokens, and saves back as MXFP4
that dequantizes to the same experts. transformers itself loads MXFP4 only with accelerate installed,
so its dequantization function is the reference here."""

from __future__ import annotations

import json
import shutil

import torch
from _hf_parity import (
    COMMON,
    TOL,
    batch,
    build_hf,
    hf_greedy,
    hf_logits,
    max_diff,
    moekit_greedy,
    transformers,
)
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from moekit.hf import from_pretrained, save_pretrained
from moekit.hf.mxfp4 import dequantize_mxfp4, quantize_mxfp4

# MXFP4 groups 32 values: hidden and expert widths are multiples of 32
CONFIG = {**COMMON, "hidden_size": 64, "head_dim": 16, "intermediate_size": 32, "num_local_experts": 4,
          "num_experts_per_tok": 2, "sliding_window": 4}
QUANT = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
FUSED = ("experts.gate_up_proj", "experts.down_proj")


def _quantize_checkpoint(src, dst):
    """src (fused fp32) rewritten in the published layout: per expert, the (out, in) rows in MXFP4."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    for k in [k for k in sd if k.endswith(FUSED)]:
        w_ERC = sd.pop(k).transpose(1, 2)
        pairs = [quantize_mxfp4(w_ERC[e]) for e in range(w_ERC.shape[0])]
        sd[k + "_blocks"] = torch.stack([b for b, _ in pairs])
        sd[k + "_scales"] = torch.stack([s for _, s in pairs])
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "quantization_config": QUANT}))
    return sd


@torch.no_grad()
def _dequantized_reference(ref, sd):
    """transformers' model with its experts replaced by transformers' dequantization of ``sd``."""
    replaced = 0
    for name, p in ref.named_parameters():
        if name.endswith(FUSED):
            p.copy_(convert_moe_packed_tensors(sd[name + "_blocks"], sd[name + "_scales"], dtype=torch.float32))
            replaced += 1
    assert replaced == 2 * ref.config.num_hidden_layers
    return ref


def test_dequantize_matches_transformers():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 8, 64, generator=g) * torch.logspace(-3, 3, 8).view(1, 8, 1)
    pairs = [quantize_mxfp4(w[e]) for e in range(3)]
    blocks, scales = torch.stack([b for b, _ in pairs]), torch.stack([s for _, s in pairs])
    theirs_ECR = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    ours = torch.stack([dequantize_mxfp4(blocks[e], scales[e]) for e in range(3)])
    assert torch.equal(ours, theirs_ECR.transpose(1, 2))
    assert (ours - w).abs().max() <= w.abs().amax() / 4  # FP4 keeps ~2 significant bits
    again = [quantize_mxfp4(ours[e]) for e in range(3)]  # dequantized values re-quantize exactly
    assert all(torch.equal(dequantize_mxfp4(b, s), ours[e]) for e, (b, s) in enumerate(again))


def test_mxfp4_checkpoint_loads_generates_and_saves(tmp_path):
    ref = build_hf(transformers.GptOssConfig(**CONFIG), tmp_path / "hf")
    sd = _quantize_checkpoint(tmp_path / "hf", tmp_path / "mxfp4")
    ref = _dequantized_reference(ref, sd)
    model = from_pretrained(tmp_path / "mxfp4")
    ids, mask = batch(CONFIG["vocab_size"], 1)
    expected = hf_logits(ref, ids, mask)
    d = max_diff(model(ids, attention_mask=mask).logits.detach(), expected, mask)
    assert d <= TOL, f"moekit vs transformers (dequantized) logits differ by {d:.3g}"
    assert torch.equal(moekit_greedy(model, ids, mask), hf_greedy(ref, ids, mask))
    # saved back in the published layout: MXFP4 blocks + scales, the same dequantized experts
    save_pretrained(model, tmp_path / "rt")
    assert json.loads((tmp_path / "rt" / "config.json").read_text())["quantization_config"] == QUANT
    back = load_file(str(tmp_path / "rt" / "model.safetensors"))
    assert set(back) == set(sd)
    for k in (k for k in sd if k.endswith("_blocks")):
        scales = k.removesuffix("_blocks") + "_scales"
        for e in range(sd[k].shape[0]):
            assert torch.equal(dequantize_mxfp4(back[k][e], back[scales][e]), dequantize_mxfp4(sd[k][e], sd[scales][e]))
    again = from_pretrained(tmp_path / "rt")
    assert torch.equal(again(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_bf16_checkpoint(tmp_path):
    """A bf16 checkpoint (the fused layout) loads in bf16, or upcast with logits equal to transformers'."""
    ref = build_hf(transformers.GptOssConfig(**CONFIG), tmp_path / "fp32")
    ref.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert from_pretrained(tmp_path / "bf16").embed.weight.dtype == torch.bfloat16
    model = from_pretrained(tmp_path / "bf16", dtype="float32")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    ids, mask = batch(CONFIG["vocab_size"], 1)
    d = max_diff(model(ids, attention_mask=mask).logits.detach(), hf_logits(ref, ids, mask), mask)
    assert d <= TOL, f"bf16 checkpoint: moekit vs transformers logits differ by {d:.3g}"
