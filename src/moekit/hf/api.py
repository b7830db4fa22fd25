"""Load and save Hugging Face MoE checkpoints as moekit models.

``from_pretrained(path)`` builds the MoETransformer on the meta device and materialises each tensor
once, in its final storage, from the (memory-mapped) shards: peak memory stays near the size of the
weights. ``save_pretrained(model, path)`` writes config.json and safetensors shards in the hub layout
(one tensor per expert) of the architecture that expresses the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moekit.config import ModelConfig
from moekit.hf import (
    arch_dbrx,
    arch_deepseek,
    arch_deepseek_v2,
    arch_ernie,
    arch_gpt_oss,
    arch_granitemoe,
    arch_jetmoe,
    arch_mixtral,
    arch_olmoe,
    arch_phimoe,
    arch_qwen,
)
from moekit.hf.adapter import Adapter, load_state, save_entries
from moekit.hf.common import CONFIG_FILE, ShardReader, parse_dtype, read_json, write_shards
from moekit.nn.transformer import MoETransformer
from moekit.rundir import RunDir, atomic_write_json, materialise

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

ADAPTERS: dict[str, Adapter] = {
    a.model_type: a
    for a in (
        arch_mixtral.ADAPTER,
        arch_qwen.QWEN2_MOE,
        arch_qwen.QWEN3_MOE,
        arch_olmoe.ADAPTER,
        arch_ernie.ADAPTER,
        arch_deepseek.ADAPTER,
        arch_deepseek_v2.ADAPTER,
        arch_gpt_oss.ADAPTER,
        arch_granitemoe.ADAPTER,
        arch_dbrx.ADAPTER,
        arch_phimoe.ADAPTER,
        arch_jetmoe.ADAPTER,
    )
}
SUPPORTED_MODEL_TYPES = tuple(ADAPTERS)
TOKENIZER_FILE = "tokenizer.json"
# HF config fields that moekit's ModelConfig does not hold, carried over when a loaded model is saved
_PASSTHROUGH = ("bos_token_id", "eos_token_id", "pad_token_id")


def _adapter(model_type: Any, where: str) -> Adapter:
    if model_type not in ADAPTERS:
        raise ValueError(
            f"{where}: model_type={model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return ADAPTERS[model_type]


def config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """moekit's ModelConfig for an HF config.json dict; ValueError names anything moekit cannot run exactly."""
    return _adapter(hf_config.get("model_type"), CONFIG_FILE).to_moekit(hf_config)


def config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> tuple[str, dict[str, Any]]:
    """(model_type, HF config dict) of the first architecture that expresses ``cfg`` (or of ``model_type``)."""
    if model_type is not None:
        return model_type, _adapter(model_type, "save_pretrained").from_moekit(cfg)
    reasons = []
    for name, adapter in ADAPTERS.items():
        try:
            return name, adapter.from_moekit(cfg)
        except ValueError as e:
            reasons.append(str(e))
    raise ValueError(
        "no Hugging Face architecture moekit writes can express this model:\n  " + "\n  ".join(reasons)
    )


def is_hf_dir(path: str | Path) -> bool:
    p = Path(path) / CONFIG_FILE
    return p.is_file() and read_json(p).get("model_type") not in (None, "moekit")


def is_moekit_dir(path: str | Path) -> bool:
    p = Path(path) / CONFIG_FILE
    return p.is_file() and read_json(p).get("model_type", "moekit") == "moekit"


def from_pretrained(path: str | Path, dtype: torch.dtype | str | None = None) -> MoETransformer:
    """Load an HF checkpoint directory (config.json + model.safetensors or an index and its shards).

    dtype: None keeps the checkpoint's dtype (that of its embedding); or float32 / bfloat16 / float16.
    Router expert biases (and ERNIE's router) stay in fp32, as in transformers. Returns the model in
    eval mode, with the source config.json kept as ``model.hf_config`` for :func:`save_pretrained`.
    """
    path = Path(path)
    hf = read_json(path / CONFIG_FILE)
    if hf.get("model_type", "moekit") == "moekit":
        raise ValueError(f"{path} is a moekit run directory, not a Hugging Face one; use moekit.hf.load_any")
    adapter = _adapter(hf.get("model_type"), str(path / CONFIG_FILE))
    cfg = adapter.to_moekit(hf)
    want = parse_dtype(dtype)
    with ShardReader(path) as reader:
        embed = adapter.global_name("embed.weight")
        target = want or (reader.dtype(embed) if embed in reader else torch.float32)
        model = materialise(cfg, lambda meta: load_state(adapter, cfg, hf, reader, meta, target))
    model.hf_config = hf
    return model


def save_pretrained(
    model: MoETransformer,
    path: str | Path,
    *,
    model_type: str | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write ``model`` as an HF checkpoint directory that transformers loads with AutoModelForCausalLM.

    The architecture is ``model_type``, else the one the model was loaded from, else the first that
    expresses the model exactly (a ValueError lists why each does not). Shards are split at
    ``max_shard_size`` with a ``model.safetensors.index.json``.
    """
    path = Path(path)
    source = getattr(model, "hf_config", None) or {}
    if model_type is None and source.get("model_type") in ADAPTERS:
        model_type = source["model_type"]
    model_type, hf = config_to_hf(model.config, model_type)
    same_arch = source.get("model_type") == model_type
    hf.update(
        {k: source[k] for k in _PASSTHROUGH + ADAPTERS[model_type].passthrough if k in source and same_arch}
    )
    hf["dtype"] = str(model.embed.weight.dtype).removeprefix("torch.")
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / CONFIG_FILE, hf, sort_keys=True)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    write_shards(save_entries(ADAPTERS[model_type], model.config, hf, state), path, max_shard_size)
    return path


def load_any(path: str | Path, dtype: torch.dtype | str | None = None):
    """(model, tokenizer or None) from a moekit run directory or an HF model directory.

    The tokenizer is a ``tokenizers.Tokenizer`` read from ``tokenizer.json`` when the directory has one
    (for a moekit run directory configured as moekit.data.tokenizer does: special tokens are never
    produced from text). A moekit run directory's model is ``moekit.rundir.RunDir.load_model(dtype)``: checked
    against its manifest (CheckpointError names a damaged or mismatching file), its ``hf_config.json``
    (written by ``moekit convert``) becoming ``model.hf_config``.
    """
    from moekit.data.tokenizer import read_tokenizer_file

    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise ValueError(
            f"{path}: no {CONFIG_FILE}; expected a moekit run directory or an HF model directory"
        )
    moekit_dir = is_moekit_dir(path)
    if moekit_dir:
        model = RunDir(path).load_model(parse_dtype(dtype))  # verified; hf_config.json -> model.hf_config
    else:
        model = from_pretrained(path, dtype)
    tok = None
    if (path / TOKENIZER_FILE).is_file():
        tok = read_tokenizer_file(path / TOKENIZER_FILE)
        if moekit_dir:
            tok.encode_special_tokens = (
                True  # as moekit.data.tokenizer configures it (not stored in the file)
            )
    return model, tok
