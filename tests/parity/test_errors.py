"""Whatever moekit cannot run exactly is refused with a ValueError that names it: never wrong logits."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from _hf_parity import COMMON, build_hf, transformers
from safetensors.torch import load_file, save_file

from moekit.hf import from_pretrained

MIXTRAL = {"num_local_experts": 4, "num_experts_per_tok": 2}


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral") / "hf"
    build_hf(transformers.MixtralConfig(**COMMON, **MIXTRAL), path)
    return path


def _copy(src, tmp_path, config_changes=None, tensors=None):
    dst = tmp_path / "bad"
    shutil.copytree(src, dst)
    if config_changes:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_changes)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors:
        sd = load_file(str(dst / "model.safetensors"))
        tensors(sd)
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_unknown_model_type(mixtral_dir, tmp_path):
    with pytest.raises(ValueError, match=r"model_type='gpt_neox' is not supported; supported: mixtral"):
        from_pretrained(_copy(mixtral_dir, tmp_path, {"model_type": "gpt_neox"}))


def test_missing_tensor(mixtral_dir, tmp_path):
    key = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    bad = _copy(mixtral_dir, tmp_path, tensors=lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match=re.escape(f"missing tensors ['{key}'")):
        from_pretrained(bad)


def test_wrong_shape(mixtral_dir, tmp_path):
    key = "model.layers.0.self_attn.k_proj.weight"
    bad = _copy(mixtral_dir, tmp_path, tensors=lambda sd: sd.update({key: torch.zeros(8, 48)}))
    with pytest.raises(
        ValueError, match=re.escape(f"wrong shape ['{key}: checkpoint (8, 48), expected (24, 48)")
    ):
        from_pretrained(bad)


def test_unknown_tensor(mixtral_dir, tmp_path):
    key = "model.layers.0.self_attn.q_proj.bias"
    bad = _copy(mixtral_dir, tmp_path, tensors=lambda sd: sd.update({key: torch.zeros(48)}))
    with pytest.raises(ValueError, match=re.escape(f"tensors moekit does not know ['{key}'")):
        from_pretrained(bad)


def test_truncated_file(mixtral_dir, tmp_path):
    bad = _copy(mixtral_dir, tmp_path)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated or damaged"):
        from_pretrained(bad)


def test_missing_shard(mixtral_dir, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(mixtral_dir)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    victim = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ValueError, match=victim.name + ": missing"):
        from_pretrained(tmp_path / "sharded")


# config fields moekit does not implement, each with the field the error must name
DS = {
    "num_key_value_heads": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 24,
    "kv_lora_rank": 16,
    "q_lora_rank": 24,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
    "n_group": 1,
    "topk_group": 1,
}
BAD_CONFIGS = {
    "rope_proportional": (
        "mixtral",
        MIXTRAL,
        {"rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4, "factor": 2.0}},
        r"rope_type='proportional' is not supported",
    ),
    "legacy_rope_scaling_su": (
        "mixtral",
        MIXTRAL,
        {"rope_parameters": None, "rope_scaling": {"type": "su", "factor": 2.0}},
        r"rope_scaling rope_type='su'",
    ),
    "rope_per_layer_type": (
        "mixtral",
        MIXTRAL,
        {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e6}}},
        r"rope_parameters differs between layer types",
    ),
    "gelu": ("mixtral", MIXTRAL, {"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
    "quantized": (
        "mixtral",
        MIXTRAL,
        {"quantization_config": {"quant_method": "fp8"}},
        r"quantization_config",
    ),
    "gpt_oss_layer_types": (
        "gpt_oss",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 12},
        {"layer_types": ["chunked_attention"] * 3},
        r"layer_types=\['chunked_attention'",
    ),
    "gpt_oss_quantized_otherwise": (
        "gpt_oss",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 12},
        {"quantization_config": {"quant_method": "fp8"}},
        r"quantization_config=\{'quant_method': 'fp8'\} is not supported",
    ),
    "ernie_bias": (
        "ernie4_5_moe",
        {"moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 24},
        {"use_bias": True},
        r"use_bias=True is not supported",
    ),
    "deepseek_attention_bias": (
        "deepseek_v3",
        DS,
        {"attention_bias": True},
        r"attention_bias=True is not supported",
    ),
    "deepseek_softmax": ("deepseek_v3", DS, {"scoring_func": "softmax"}, r"scoring_func='softmax'"),
    "deepseek_v2_topk_method": ("deepseek_v2", DS, {"topk_method": "noaux_tc"}, r"topk_method='noaux_tc'"),
    "deepseek_v2_norm_topk": ("deepseek_v2", DS, {"norm_topk_prob": True}, r"norm_topk_prob=True"),
    "phimoe_top3": ("phimoe", {"num_local_experts": 4}, {"num_experts_per_tok": 3}, r"num_experts_per_tok=3"),
    "jetmoe_norm_eps": ("jetmoe", {"num_local_experts": 4, "kv_channels": 8}, {"rms_norm_eps": 1e-5},
                        r"rms_norm_eps=1e-05 is not supported"),
    "partial_rope": (
        "qwen3_moe",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24},
        {"partial_rotary_factor": 0.5},
        r"partial_rotary_factor=0.5",
    ),
}
CONFIG_CLASSES = {
    "mixtral": "MixtralConfig",
    "qwen2_moe": "Qwen2MoeConfig",
    "qwen3_moe": "Qwen3MoeConfig",
    "ernie4_5_moe": "Ernie4_5_MoeConfig",
    "deepseek_v3": "DeepseekV3Config",
    "deepseek_v2": "DeepseekV2Config",
    "gpt_oss": "GptOssConfig",
    "phimoe": "PhimoeConfig",
    "jetmoe": "JetMoeConfig",
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_unsupported_config_field(case, tmp_path):
    arch, kw, changes, message = BAD_CONFIGS[case]
    cfg = getattr(transformers, CONFIG_CLASSES[arch])(**{**COMMON, **kw}).to_dict()
    cfg.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(cfg))  # refused before any tensor is read
    with pytest.raises(ValueError, match=message):
        from_pretrained(tmp_path)


def test_dbrx_norm_p_refused(tmp_path):
    cfg = transformers.DbrxConfig(d_model=48, n_heads=4, n_layers=2, vocab_size=160,
                                  attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 1e4},
                                  ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2}).to_dict()
    cfg["ffn_config"]["moe_normalize_expert_weights"] = 2.0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"moe_normalize_expert_weights=2.0 is not supported"):
        from_pretrained(tmp_path)
