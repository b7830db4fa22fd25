"""Every published config.json moekit spec holds (moekit/spec/presets.py) loads as published -- YaRN RoPE
(DeepSeek-V3, gpt-oss), sliding windows, MXFP4 quantization_config, gpt-oss's experts_per_token -- into a
model with exactly the parameters the spec counts (built on the meta device: nothing is allocated)."""

from __future__ import annotations

import pytest
import torch

from moekit.hf import config_from_hf
from moekit.model import MoETransformer
from moekit.spec import PRESETS, count_params, get_preset

MXFP4 = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


@pytest.mark.parametrize("name", list(PRESETS))
def test_published_config_loads_with_the_spec_count(name):
    hf = get_preset(name)
    if hf["model_type"] == "gpt_oss":
        hf["quantization_config"] = MXFP4  # as published
    cfg = config_from_hf(hf)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    # DeepSeek-V3's routing bias is a buffer in its checkpoints, which the spec counts (V2 has none: moekit's
    # zero bias there is not stored)
    stored_bias = hf["model_type"] == "deepseek_v3"
    buffers = sum(b.numel() for n, b in model.named_buffers() if n.endswith("router.expert_bias") and stored_bias)
    assert sum(p.numel() for p in model.parameters()) + buffers == count_params(hf).total_params
