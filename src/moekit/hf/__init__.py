"""Hugging Face interop: read, run and write HF MoE checkpoints (config.json + safetensors shards).

``from_pretrained(path, dtype=None)``, ``save_pretrained(model, path)``, ``load_any(path)`` for a
moekit run directory or an HF model directory. Architectures: mixtral, qwen2_moe, qwen3_moe, olmoe,
ernie4_5_moe, deepseek_v3, deepseek_v2, gpt_oss (MXFP4 or bf16), granitemoe, dbrx, phimoe, jetmoe.
transformers is never imported here (it is only the tests' reference).
"""

from moekit.hf.api import (
    ADAPTERS,
    SUPPORTED_MODEL_TYPES,
    config_from_hf,
    config_to_hf,
    from_pretrained,
    is_hf_dir,
    is_moekit_dir,
    load_any,
    save_pretrained,
)

__all__ = [
    "ADAPTERS",
    "SUPPORTED_MODEL_TYPES",
    "config_from_hf",
    "config_to_hf",
    "from_pretrained",
    "is_hf_dir",
    "is_moekit_dir",
    "load_any",
    "save_pretrained",
]
