"""`moekit train --init-from PATH`: start a run from the weights of a moekit run or a Hugging Face model.

The run takes PATH's model whole: its ModelConfig (the architecture), its weights (as float32, the dtype
moekit trains in) and its ``tokenizer.json``, which encodes the training data in place of a newly trained
BPE (``moekit.data.prepare_data(tokenizer_path=...)``). Only fields that leave the weights' shapes and
meaning alone may differ from PATH's config (``TRAINING_ONLY``: loss weights, token dropping, ...).

The run directory keeps, beside the usual files, what says how PATH's token ids are meant: an HF source's
config as ``hf_config.json`` and its tokenizer files (as ``moekit convert`` does), so that ``moekit
generate`` stops at its end-of-sequence token and ``moekit convert`` writes its architecture back; and
``init_from.json``, which tells ``--resume`` to encode with the run's tokenizer.json again.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.config import ModelConfig, training_only_fields
from moekit.data.tokenizer import document_separator, vocab_extent
from moekit.rundir import CONFIG_FILE, TOKENIZER_FILE, RunDir, atomic_copy

__all__ = ["TRAINING_ONLY", "InitModel", "architecture_diff", "load_init", "load_init_state"]

# tokenizer and generation files beside an HF model's weights, kept in the run directory
COMPANION_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# ModelConfig fields ("moe." for MoEConfig's) that change neither the parameters nor what they mean: those
# declared ``training_only`` in moekit.config (the CLI reads the same marking)
TRAINING_ONLY = training_only_fields(ModelConfig)


@dataclass(frozen=True)
class InitModel:
    """What a run takes from ``--init-from PATH``."""

    path: Path
    config: ModelConfig
    state: dict[str, torch.Tensor]  # float32 (buffers as stored), keyed as MoETransformer(config).state_dict()
    tokenizer_path: Path
    separator: int | None  # the document separator of the token files (moekit.data.document_separator)
    hf_config: dict[str, Any] | None  # an HF source's config.json (or a converted run's hf_config.json)

    @property
    def source(self) -> str:
        return f"Hugging Face {self.hf_config.get('model_type')}" if self.hf_config else "moekit run"

    def write_run_files(self, run_dir: Path) -> None:
        """hf_config.json and the HF tokenizer files of PATH, and init_from.json, into ``run_dir``."""
        run = RunDir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.hf_config is not None:
            run.write_hf_config(self.hf_config)
        for name in COMPANION_FILES:
            if (self.path / name).is_file():
                atomic_copy(self.path / name, run_dir / name)
        run.write_init_record({"init_from": str(self.path.resolve()), "source": self.source,
                               "separator": self.separator})


def load_init(path: str | Path) -> InitModel:
    """Load PATH (a moekit run directory or an HF model directory) with the tokenizer.json beside it.

    FileNotFoundError without config.json or tokenizer.json; ValueError when the tokenizer's ids (or the
    end-of-sequence id that separates documents) do not fit the model's vocab_size.
    """
    from moekit.hf import load_any  # the HF loaders: only an --init-from run needs them

    path = Path(path)
    where = f"--init-from {path}"
    if not RunDir(path).config_path.is_file():  # an HF directory's config has the same name
        raise FileNotFoundError(f"{where}: no {CONFIG_FILE}; expected a moekit run directory or a Hugging Face "
                                "model directory")
    if not (path / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{where}: no {TOKENIZER_FILE}; the run's data must be encoded with the model's "
                                f"own tokenizer (put the model's {TOKENIZER_FILE} there)")
    model, tok = load_any(path, dtype=torch.float32)
    cfg = model.config
    extent = vocab_extent(tok)
    if extent > cfg.vocab_size:
        raise ValueError(f"{where}: {TOKENIZER_FILE} has token ids up to {extent - 1} but the model's "
                         f"vocab_size is {cfg.vocab_size}; the tokenizer is not this model's")
    sep = document_separator(tok, path)
    if sep is not None and sep >= cfg.vocab_size:
        raise ValueError(f"{where}: the end-of-sequence id {sep} is outside the model's vocab_size "
                         f"{cfg.vocab_size}")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return InitModel(path, cfg, state, path / TOKENIZER_FILE, sep, getattr(model, "hf_config", None))


def _flat(cfg: ModelConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in cfg.to_dict().items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def architecture_diff(a: ModelConfig, b: ModelConfig) -> list[str]:
    """The fields, other than TRAINING_ONLY ones, in which two configs differ: ``["moe.top_k: 2 != 1"]``."""
    fa, fb = _flat(a), _flat(b)
    return [f"{k}: {fa.get(k)!r} != {fb.get(k)!r}" for k in sorted(fa.keys() | fb.keys())
            if k not in TRAINING_ONLY and fa.get(k) != fb.get(k)]


def load_init_state(path: str | Path, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The weights of PATH for ``train(model_cfg, ..., init_state=...)``; model_cfg must have PATH's
    architecture (ValueError lists the fields that differ)."""
    init = load_init(path)
    diff = architecture_diff(init.config, model_cfg)
    if diff:
        raise ValueError(f"--init-from {path}: the model's architecture differs from PATH's: {'; '.join(diff)}")
    return init.state
