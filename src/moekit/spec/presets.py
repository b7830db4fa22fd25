"""Published MoE models as their real HF ``config.json`` fields, counted like any other config.json.

Values are copied from each model's hub config (non-architectural keys such as auto_map and
quantization_config dropped). ``PUBLISHED`` holds the figures the tests hold the counts to.
"""
from __future__ import annotations

import copy
from typing import Any, NamedTuple

__all__ = ["PRESETS", "PUBLISHED", "Published", "get_preset"]


class Published(NamedTuple):
    """A model's parameter counts as its authors publish them: the text with its own number of digits
    ("46.7B"), and where it was published. A count agrees when it is within one unit of the last digit
    given (sources round or truncate: "37B" for 37.55B)."""

    total: str
    active: str
    source: str
    # "with_embedding": input embedding and LM head both in active (our convention);
    # "no_embedding": the source leaves the input embedding out (compare active_params_no_embedding)
    convention: str = "with_embedding"

    @staticmethod
    def value(text: str) -> float:
        return float(text.removesuffix("B")) * 1e9

    @staticmethod
    def unit(text: str) -> float:
        """One unit of the last digit given: "46.7B" -> 0.1e9."""
        digits = text.removesuffix("B").partition(".")[2]
        return 10.0 ** -len(digits) * 1e9

    def agrees(self, total: float, active: float) -> bool:
        return all(abs(n - self.value(t)) < self.unit(t) for n, t in ((total, self.total), (active, self.active)))


_MIXTRAL_8X7B: dict[str, Any] = {  # mistralai/Mixtral-8x7B-v0.1
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
    "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000,
}

# mistral-community/Mixtral-8x22B-v0.1, the first HF conversion (32000 tokens, the basis of the 140.62B
# figure); mistralai's later uploads carry the v3 tokenizer's 32768 tokens (+0.01% params).
_MIXTRAL_8X22B: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
    "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 6144, "initializer_range": 0.02, "intermediate_size": 16384,
    "max_position_embeddings": 65536, "num_attention_heads": 48, "num_experts_per_tok": 2,
    "num_hidden_layers": 56, "num_key_value_heads": 8, "num_local_experts": 8,
    "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000,
}

_QWEN15_MOE_A27B: dict[str, Any] = {  # Qwen/Qwen1.5-MoE-A2.7B
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
    "attention_dropout": 0.0, "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5632,
    "max_position_embeddings": 8192, "max_window_layers": 21, "moe_intermediate_size": 1408,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 60, "num_experts_per_tok": 4,
    "num_hidden_layers": 24, "num_key_value_heads": 16, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 5632, "sliding_window": 32768, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}

_QWEN3_30B_A3B: dict[str, Any] = {  # Qwen/Qwen3-30B-A3B
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "decoder_sparse_step": 1,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "moe_intermediate_size": 768, "norm_topk_prob": True,
    "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
    "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}

_OLMOE_1B_7B: dict[str, Any] = {  # allenai/OLMoE-1B-7B-0924
    "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
    "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None, "eos_token_id": 50279,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 1024,
    "max_position_embeddings": 4096, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16, "num_key_value_heads": 16,
    "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 50304,
}

_DEEPSEEK_V3: dict[str, Any] = {  # deepseek-ai/DeepSeek-V3
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 0,
    "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1,
    "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


_DEEPSEEK_V2_LITE: dict[str, Any] = {  # deepseek-ai/DeepSeek-V2-Lite
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 100000,
    "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
    "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}


def _gpt_oss(n_layers: int, n_experts: int) -> dict[str, Any]:
    """openai/gpt-oss-20b and -120b differ only in depth and expert count."""
    return {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
        "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002, "experts_per_token": 4,
        "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
        "initializer_range": 0.02, "intermediate_size": 2880,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)],
        "max_position_embeddings": 131072, "num_attention_heads": 64, "num_experts_per_tok": 4,
        "num_hidden_layers": n_layers, "num_key_value_heads": 8, "num_local_experts": n_experts,
        "output_router_logits": False, "pad_token_id": 199999, "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                         "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "use_cache": True, "vocab_size": 201088,
    }


PRESETS: dict[str, dict[str, Any]] = {
    "mixtral-8x7b": _MIXTRAL_8X7B,
    "mixtral-8x22b": _MIXTRAL_8X22B,
    "qwen1.5-moe-a2.7b": _QWEN15_MOE_A27B,
    "qwen3-30b-a3b": _QWEN3_30B_A3B,
    "olmoe-1b-7b": _OLMOE_1B_7B,
    "deepseek-v3": _DEEPSEEK_V3,
    "deepseek-v2-lite": _DEEPSEEK_V2_LITE,
    "gpt-oss-20b": _gpt_oss(24, 32),
    "gpt-oss-120b": _gpt_oss(36, 128),
}

PUBLISHED: dict[str, Published] = {
    "mixtral-8x7b": Published("46.7B", "12.9B", "Mistral AI, 'Mixtral of experts' (blog, 2023-12-11): "
                              "'46.7B total parameters but only uses 12.9B parameters per token'"),
    "mixtral-8x22b": Published("141B", "39B", "Mistral AI, 'Cheaper, Better, Faster, Stronger' (blog, "
                               "2024-04-17): '39B active parameters out of 141B'"),
    "qwen1.5-moe-a2.7b": Published("14.3B", "2.7B", "Qwen team, 'Qwen1.5-MoE' (blog, 2024-03-28), model "
                                   "table: 14.3B parameters, 2.7B activated"),
    "qwen3-30b-a3b": Published("30.5B", "3.3B", "Qwen/Qwen3-30B-A3B model card: '30.5B in total and 3.3B "
                               "activated'"),
    "olmoe-1b-7b": Published("6.9B", "1.3B", "Muennighoff et al., 'OLMoE' (arXiv 2409.02060): 6.9B total, "
                             "1.3B active per token"),
    # without the multi-token-prediction module (the checkpoint's 685B includes it)
    "deepseek-v3": Published("671B", "37B", "DeepSeek-V3 technical report (arXiv 2412.19437): '671B total "
                             "parameters with 37B activated for each token'"),
    "gpt-oss-20b": Published("20.91B", "3.61B", "OpenAI, gpt-oss model card (2025-08-05), table 1",
                             "no_embedding"),
    "gpt-oss-120b": Published("116.83B", "5.13B", "OpenAI, gpt-oss model card (2025-08-05), table 1",
                              "no_embedding"),
}


def get_preset(name: str) -> dict[str, Any]:
    """A copy of the preset's config.json dict (names are case-insensitive)."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[key])
