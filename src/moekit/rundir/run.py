"""RunDir: the paths of a run directory's files and the one way to read and write each (see moekit.rundir)."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from torch import nn

from moekit.config import ModelConfig, TrainConfig
from moekit.rundir import checkpoints as ckpt
from moekit.rundir.files import (
    COMPARE_FILE,
    CONFIG_FILE,
    DATA_DIR,
    DCP_DIR,
    HF_CONFIG_FILE,
    INIT_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    MODEL_FILE,
    MODEL_INDEX_FILE,
    QUANT_FILE,
    RANKS_DIR,
    STATE_FILE,
    TOKENIZER_FILE,
    TRAIN_CONFIG_FILE,
    DamagedFileError,
    atomic_copy,
    atomic_write,
    atomic_write_json,
)
from moekit.rundir.quantized import load_quantized
from moekit.rundir.shards import ShardReader
from moekit.rundir.weights import (
    CheckpointError,
    _check_match,
    materialise,
    save_weights,
)

if TYPE_CHECKING:
    from moekit.nn.transformer import MoETransformer

__all__ = ["RunDir", "load_checkpoint", "read_manifest", "save_checkpoint"]


def _file(name: str) -> property:
    return property(lambda self: self.path / name, doc=f"``<run>/{name}``")


@dataclass(frozen=True, init=False)
class RunDir:
    """A run directory: the paths of its files and the one way to read and write each (module docstring)."""

    path: Path

    def __init__(self, path: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "path", Path(path))

    def __fspath__(self) -> str:
        return str(self.path)

    # -- where things are -------------------------------------------------------------------------
    config_path = _file(CONFIG_FILE)
    train_config_path = _file(TRAIN_CONFIG_FILE)
    metrics_path = _file(METRICS_FILE)
    tokenizer_path = _file(TOKENIZER_FILE)
    model_path = _file(MODEL_FILE)
    state_path = _file(STATE_FILE)
    manifest_path = _file(MANIFEST_FILE)
    dcp_dir = _file(DCP_DIR)
    hf_config_path = _file(HF_CONFIG_FILE)
    init_path = _file(INIT_FILE)
    data_dir = _file(DATA_DIR)

    def rank_dir(self, rank: int) -> RunDir:
        """Rank 0 writes the run directory itself; rank r > 0 its own files under ranks/rank<r>."""
        return self if rank == 0 else RunDir(self.path / RANKS_DIR / f"rank{rank}")

    def is_run(self) -> bool:
        """Whether the directory holds a model config (a moekit run, or an HF directory: same file name)."""
        return self.config_path.is_file()

    def has_checkpoint(self) -> bool:
        return self.manifest_path.is_file()

    def has_dcp(self) -> bool:
        """Whether a distributed checkpoint is there (read it with moekit.parallel.checkpoint, at ``dcp_dir``):
        also when only ``dcp.old`` is left, by a distributed save interrupted between its two renames."""
        return self.dcp_dir.is_dir() or self.dcp_dir.with_name(self.dcp_dir.name + ".old").is_dir()

    # -- configs ----------------------------------------------------------------------------------
    def _read_json(self, path: Path, what: str) -> dict[str, Any]:
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no {what}; is {self.path} a moekit run directory?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DamagedFileError(f"{path}: not valid JSON ({e}); the {what} is damaged") from None
        if not isinstance(d, dict):
            raise DamagedFileError(f"{path}: holds {type(d).__name__}, not the JSON object of a {what}")
        return d

    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self._read_json(self.config_path, "model config"))

    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict(self._read_json(self.train_config_path, "training config"))

    def write_config(self, cfg: ModelConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.config_path, cfg.to_dict())

    def write_train_config(self, cfg: TrainConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.train_config_path, cfg.to_dict())

    def hf_config(self) -> dict[str, Any] | None:
        """The HF config kept by ``moekit convert`` / ``train --init-from``, or None."""
        return self._read_json(self.hf_config_path, "HF config") if self.hf_config_path.is_file() else None

    def write_hf_config(self, hf_config: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.hf_config_path, hf_config)

    def compare_plan(self) -> dict[str, Any] | None:
        """A comparison directory's plan and finished rows (compare.json), or None when there is none."""
        path = self.path / COMPARE_FILE
        return self._read_json(path, "comparison plan") if path.is_file() else None

    def write_compare_plan(self, plan: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / COMPARE_FILE, plan)

    def write_init_record(self, record: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.init_path, record)

    # -- metrics ----------------------------------------------------------------------------------
    def _metric_lines(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for line in self.metrics_path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                return  # a torn last line from a killed process
            yield line, rec

    def metrics(self) -> list[dict[str, Any]]:
        """The records of metrics.jsonl in file order (a resumed run re-logs the steps after its checkpoint)."""
        if not self.metrics_path.is_file():
            raise FileNotFoundError(f"{self.metrics_path}: no {METRICS_FILE}; is {self.path} a moekit run directory?")
        return [rec for _, rec in self._metric_lines()]

    def reset_metrics(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.metrics_path, b"")

    def truncate_metrics(self, last_step: int) -> None:
        """Drop records logged after the checkpoint a run resumes from (they will be recomputed)."""
        if self.metrics_path.is_file():
            keep = [line for line, rec in self._metric_lines() if rec.get("step", 0) <= last_step]
            atomic_write(self.metrics_path, "".join(line + "\n" for line in keep))

    def open_metrics(self) -> IO[str]:
        """metrics.jsonl opened for appending (the caller writes one JSON line per record and closes it)."""
        self.path.mkdir(parents=True, exist_ok=True)
        return open(self.metrics_path, "a")

    # -- tokenizer (read it with moekit.data.load_tokenizer(run.tokenizer_path)) -----------------
    def copy_tokenizer(self, src: str | os.PathLike[str]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_copy(src, self.tokenizer_path)

    # -- checkpoints (moekit.rundir.checkpoints) ---------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        return ckpt.read_manifest(self.path)

    def save_checkpoint(self, model: nn.Module, train_state: dict[str, Any], step: int, keep: int = 2) -> None:
        """Write, checksum and commit a checkpoint of ``step``; keep ``keep`` checkpoints in all."""
        ckpt.save(self.path, model, train_state, step, keep)

    def load_checkpoint(self, model: nn.Module, step: int | None = None) -> dict[str, Any]:
        """Verify and load the latest checkpoint (or the kept one of ``step``); return the train state."""
        return ckpt.load(self.path, model, step)

    def kept_checkpoint_steps(self) -> list[int]:
        """Steps of the older checkpoints kept beside the latest, newest first."""
        return ckpt.kept_steps(self.path)

    def promote_checkpoint(self, step: int) -> None:
        """Make the kept checkpoint of ``step`` the latest (the newer ones are moved aside, not deleted)."""
        ckpt.promote(self.path, step)

    # -- the run as a model -----------------------------------------------------------------------
    def save_model(self, model: MoETransformer) -> None:
        """config.json, model.safetensors and (for a model from Hugging Face) hf_config.json."""
        self.write_config(model.config)
        save_weights(model, self.model_path)
        if getattr(model, "hf_config", None):
            self.write_hf_config(model.hf_config)

    def load_model(self, dtype: torch.dtype | None = None) -> MoETransformer:
        """The run's model in eval mode on the CPU: the one way to load a moekit run directory as a model.

        1. config.json (FileNotFoundError, or ValueError naming the file);
        2. the weights file: a run that holds only a distributed checkpoint is refused with the call that
           exports it; with a manifest, the file's size is checked against it so a truncated file is
           reported as such (a damaged manifest does not stop loading: the file itself is still checked);
        3. the model is built on the meta device and each tensor read once from the memory-mapped file,
           after the names and shapes are checked (CheckpointError lists the mismatches); ``dtype`` casts the
           floating tensors except the routers' expert biases (None keeps the file's dtypes);
        4. hf_config.json, when present, becomes ``model.hf_config``.
        """
        cfg = self.config()
        weights = self.model_path
        if not weights.is_file() and self.has_dcp():  # a distributed run checkpoints to DCP only
            dcp = self.dcp_dir
            raise CheckpointError(f"{weights}: missing; {self.path} holds a distributed checkpoint ({dcp}). The "
                                  "moekit commands write the single-file weights on first use; from Python: "
                                  "moekit.parallel.run_export.export_if_distributed(run_dir)")
        if weights.is_file() and self.has_checkpoint():
            try:
                manifest = self.read_manifest()
            except CheckpointError:
                manifest = None  # a damaged manifest does not stop inference: the file itself is still checked
            if manifest is not None and MODEL_FILE in manifest["files"]:
                # the size only: a checksum would read every byte of a large model once more (resume checks it)
                ckpt.check_file(self.path, manifest, MODEL_FILE, digest=False)

        if not weights.is_file() and not (self.path / MODEL_INDEX_FILE).is_file():
            raise CheckpointError(f"{weights}: no such weights file")
        if (self.path / QUANT_FILE).is_file():  # quantized experts: swapped-in modules, read as stored
            return load_quantized(self, dtype)

        def fill(meta_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            # one file or an index and its shards (moekit new writes one shard per layer)
            try:
                reader = ShardReader(self.path)
            except ValueError as e:
                raise CheckpointError(f"{e}") from e
            with reader:
                _check_match(self.path / (MODEL_FILE if weights.is_file() else MODEL_INDEX_FILE),
                             {k: tuple(t.shape) for k, t in meta_state.items()},
                             {k: reader.shape(k) for k in reader}, strict=True)
                state = {}
                for k in meta_state:
                    x = reader.get(k)
                    keep = dtype is None or not x.is_floating_point() or k.endswith("expert_bias")
                    state[k] = x if keep else x.to(dtype)
            return state

        model = materialise(cfg, fill)
        hf = self.hf_config()
        if hf is not None:
            model.hf_config = hf
        return model


# the same operations on a run directory given as a path
def save_checkpoint(run_dir: str | os.PathLike[str], model: nn.Module, train_state: dict[str, Any], step: int) -> None:
    RunDir(run_dir).save_checkpoint(model, train_state, step)


def load_checkpoint(run_dir: str | os.PathLike[str], model: nn.Module) -> dict[str, Any]:
    return RunDir(run_dir).load_checkpoint(model)


def read_manifest(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    return RunDir(run_dir).read_manifest()
