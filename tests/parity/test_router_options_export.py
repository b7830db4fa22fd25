"""Options on the routers that no Hugging Face architecture expresses are refused on export, by name;
DeepSeek-V3's loader pins the group score its checkpoints' code computes."""
from __future__ import annotations

import pytest

from moekit.config import ModelConfig, MoEConfig
from moekit.hf.api import config_from_hf, config_to_hf


def _cfg(**moe) -> ModelConfig:
    return ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=32,
                       moe=MoEConfig(d_model=16, d_hidden=8, num_experts=4, top_k=2, **moe))


def test_plain_topk_still_exports():
    assert config_to_hf(_cfg())[0] in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@pytest.mark.parametrize("moe", [{"num_null_experts": 1}, {"num_copy_experts": 1}])
def test_null_and_zero_compute_experts_are_refused(moe):
    with pytest.raises(ValueError, match="null / zero-computation experts"):
        config_to_hf(_cfg(**moe))


def test_deepseek_v3_sums_two_per_group_whatever_k_over_m():
    hf = {"model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64,
          "n_routed_experts": 8, "num_experts_per_tok": 4, "n_group": 2, "topk_group": 1,
          "moe_intermediate_size": 8, "kv_lora_rank": 8, "q_lora_rank": None, "qk_nope_head_dim": 4,
          "qk_rope_head_dim": 4, "v_head_dim": 4, "n_shared_experts": 1, "first_k_dense_replace": 0}
    moe = config_from_hf(hf).moe
    assert (moe.group_score, moe.group_top) == ("sum_top", 2)  # ceil(K/M) would be 4
    cfg = config_from_hf(hf)
    assert config_to_hf(cfg, "deepseek_v3")[1]["n_group"] == 2
    bad = cfg.replace(moe=moe.replace(group_score_top=None))
    with pytest.raises(ValueError, match="summing 4"):
        config_to_hf(bad, "deepseek_v3")
