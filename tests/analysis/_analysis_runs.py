"""Helpers of the analysis tests: a tiny Python corpus, tiny model/train configs, quiet training."""
from __future__ import annotations

import contextlib
import io
import shutil
import sysconfig
from pathlib import Path

import torch

from moekit.config import ModelConfig, MoEConfig, TrainConfig
from moekit.data import DataInfo, split_of
from moekit.train.loop import TrainResult, train

STDLIB = Path(sysconfig.get_paths()["stdlib"])
VOCAB = 320


def tiny_corpus(dst: Path, train_bytes: int = 150_000, val_docs: int = 3) -> Path:
    """A folder of real stdlib modules whose (hash-decided) split has ``val_docs`` validation files,
    so that re-reading the corpus with prepare_data's default split gives the same documents."""
    dst.mkdir(parents=True)
    used = {"train": 0, "val": 0}
    for src in sorted(STDLIB.glob("*.py")):
        size = src.stat().st_size
        split = split_of(src.name, 0.05)
        if size > 40_000 or (split == "val" and used["val"] >= val_docs) or \
                (split == "train" and used["train"] + size > train_bytes):
            continue
        shutil.copyfile(src, dst / src.name)
        used[split] += size if split == "train" else 1
        if used["val"] >= val_docs and used["train"] > train_bytes - 5_000:
            break
    return dst


def tiny_model(vocab_size: int, *, layers: int = 2, experts: int = 4, top_k: int = 2, router: str = "topk",
               dense: bool = False, **moe) -> ModelConfig:
    d = 32
    return ModelConfig(vocab_size=vocab_size, d_model=d, n_layers=layers, n_heads=2, max_seq_len=64, dense=dense,
                       moe=MoEConfig(d_model=d, d_hidden=2 * d, num_experts=experts, top_k=top_k, router=router,
                                     **moe))


def tiny_train(**kw) -> TrainConfig:
    base = {"steps": 12, "batch_size": 8, "seq_len": 32, "lr": 3e-3, "warmup_steps": 2, "eval_interval": 6,
            "eval_batches": 2, "ckpt_interval": 1000, "vocab_size": VOCAB, "threads": 1}
    return TrainConfig(**(base | kw))


def quiet_train(model_cfg: ModelConfig, cfg: TrainConfig, run_dir: Path, data: DataInfo) -> TrainResult:
    """train() on one thread (as `moekit train --threads 1`), its progress lines swallowed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return train(model_cfg, cfg, run_dir, data)
    finally:
        torch.set_num_threads(threads)
