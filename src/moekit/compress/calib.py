"""Calibration and evaluation tokens for compress: the run's built-in splits, or a file given by the user.

A run directory made by ``moekit train`` holds its prepared data (``data/train.bin``, ``data/val.bin``);
a run without it (converted, pruned, quantized) gets the built-in corpus prepared with its own tokenizer
into a temporary directory.
"""
from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from moekit.data import load_tokenizer
from moekit.rundir import RunDir

__all__ = ["calibration_batches", "split_tokens", "text_tokens"]


def split_tokens(run: RunDir, split: str = "val") -> Path:
    """Path of the ``split`` token file of ``run``'s data (prepared from the built-in corpus if absent)."""
    path = run.data_dir / f"{split}.bin"
    if path.is_file():
        return path
    from moekit.data import prepare_data

    out = Path(tempfile.mkdtemp(prefix="moekit-calib-"))
    prepare_data(out, None, tokenizer_path=run.tokenizer_path)
    return out / f"{split}.bin"


def text_tokens(run: RunDir, path: Path) -> Tensor:
    """Token ids of a text file, a folder of text files, or a ``.jsonl`` with a "text" field."""
    tok = load_tokenizer(run.tokenizer_path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    ids: list[int] = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        if f.suffix == ".jsonl":
            text = "\n".join(json.loads(line)["text"] for line in text.splitlines() if line.strip())
        ids += tok.encode(text).ids
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(run: RunDir, calib: str | Path | None = None, split: str = "val", *, seq_len: int = 128,
                        batch_size: int = 16, max_tokens: int | None = 32768) -> Iterator[Tensor]:
    """(B, seq_len) int64 windows: of ``calib`` (a token ``.bin`` with its sidecar, or text) or of ``split``.

    Windows are disjoint and evenly spread over the file (``TokenDataset.iter_eval_batches``)."""
    from moekit.data import TokenDataset

    if calib is not None and Path(calib).suffix != ".bin":
        ids = text_tokens(run, Path(calib))
        n = (ids.numel() - 1) // seq_len
        if n < 1:
            raise ValueError(f"--calib {calib}: {ids.numel()} tokens, need more than seq_len={seq_len}")
        if max_tokens is not None:
            n = min(n, max(1, max_tokens // seq_len))
        wins = ids[: n * seq_len].view(n, seq_len)
        yield from wins.split(batch_size)
        return
    data = TokenDataset(Path(calib) if calib is not None else split_tokens(run, split))
    batches = None if max_tokens is None else max(1, max_tokens // (seq_len * batch_size))
    for x, _ in data.iter_eval_batches(batch_size, seq_len, batches):
        yield x
