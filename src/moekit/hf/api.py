"""Load and save Hugging Face MoE checkpoints as moekit models.

``from_pretrained(path)`` builds the MoETransformer on the meta device and materialises each tensor
once, in its final storage, from the (memory-mapped) shards: peak memory stays near the size of the
weights. ``save_pretrained(model, path)`` writes config.json and safetensors shards in the hub layout
(one tensor per expert) of the architecture that expresses the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from moekit.hf import arch_deepseek, arch_ernie, arch_mixtral, arch_olmoe, arch_qwen
from moekit.hf.adapter import Adapter, load_state, save_entries
from moekit.hf.common import CONFIG_FILE, ShardReader, parse_dtype, read_json, write_shards
from moekit.nn.transformer import ModelConfig, MoETransformer

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
    return _adapter(hf_config.get("model_type"), "config.json").to_moekit(hf_config)


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


class _SkipInit(TorchFunctionMode):
    """Turns the in-place initialisers into no-ops while the meta model is built: every tensor is then
    overwritten from the checkpoint, and running them on meta tensors would import torch's Python
    decompositions (~70 MB resident, as much as a small model)."""

    INIT = frozenset(
        {"normal_", "uniform_", "zero_", "fill_", "kaiming_uniform_", "trunc_normal_", "ones_", "zeros_"}
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.INIT:
            return next(a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


def _materialise(cfg: ModelConfig, fill) -> MoETransformer:
    """Build the model on the meta device, then give every tensor its real storage from ``fill``."""
    with torch.device("meta"), _SkipInit():
        model = MoETransformer(cfg)
    state = fill(model.state_dict())
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


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
        embed = "model.embed_tokens.weight"
        target = want or (reader.dtype(embed) if embed in reader else torch.float32)
        model = _materialise(cfg, lambda meta: load_state(adapter, cfg, hf, reader, meta, target))
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
    (path / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    write_shards(save_entries(ADAPTERS[model_type], model.config, hf, state), path, max_shard_size)
    return path


def _load_moekit_dir(path: Path, dtype: torch.dtype | None) -> MoETransformer:
    cfg = ModelConfig.from_json(path / CONFIG_FILE)

    def fill(meta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with ShardReader(path) as reader:
            missing = sorted(set(meta) - set(reader))
            unexpected = sorted(set(reader) - set(meta))
            wrong = [
                f"{k}: file {reader.shape(k)}, model {tuple(t.shape)}"
                for k, t in meta.items()
                if k in reader and reader.shape(k) != tuple(t.shape)
            ]
            if missing or unexpected or wrong:
                raise ValueError(
                    f"{path}: model.safetensors does not match config.json: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
                )
            state = {}
            for k in meta:
                x = reader.get(k)
                keep = dtype is None or not x.is_floating_point() or k.endswith("expert_bias")
                state[k] = x if keep else x.to(dtype)
            return state

    return _materialise(cfg, fill)


def load_any(path: str | Path, dtype: torch.dtype | str | None = None):
    """(model, tokenizer or None) from a moekit run directory or an HF model directory.

    The tokenizer is a ``tokenizers.Tokenizer`` read from ``tokenizer.json`` when the directory has one
    (for a moekit run directory configured as moekit.data.tokenizer does: special tokens are never
    produced from text). A moekit run directory's ``hf_config.json`` (written by ``moekit convert``)
    becomes ``model.hf_config``.
    """
    from tokenizers import Tokenizer

    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise ValueError(
            f"{path}: no {CONFIG_FILE}; expected a moekit run directory or an HF model directory"
        )
    moekit_dir = is_moekit_dir(path)
    if moekit_dir:
        model = _load_moekit_dir(path, parse_dtype(dtype))
        if (path / "hf_config.json").is_file():
            model.hf_config = read_json(path / "hf_config.json")
    else:
        model = from_pretrained(path, dtype)
    tok = None
    if (path / TOKENIZER_FILE).is_file():
        tok = Tokenizer.from_file(str(path / TOKENIZER_FILE))
        if moekit_dir:
            tok.encode_special_tokens = (
                True  # as moekit.data.tokenizer configures it (not stored in the file)
            )
    return model, tok
