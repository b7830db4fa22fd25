"""Token files on disk, the batch sampler over them, and ``prepare_data`` which builds both.

Shape legend: B batch size, T sequence length, N tokens in a split file, V vocabulary size.

A token file ``<split>.bin`` is a flat array of N ids (uint16 when V <= 2**16, else uint32)
read through ``np.memmap``, with a sidecar ``<split>.json`` holding ``dtype``, ``length``,
``vocab_size`` and ``eot_id``. Documents are joined as ``doc EOT doc EOT ...`` (with a model's own
tokenizer, ``prepare_data(tokenizer_path=...)``: its separator, see ``document_separator``, or none).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer

from moekit.data.corpus import Corpus, load_corpus, source_id
from moekit.data.tokenizer import (
    EOT,
    TOKENIZER_FILE,
    document_separator,
    eot_id,
    read_tokenizer_file,
    save_tokenizer,
    train_tokenizer,
    vocab_extent,
)
from moekit.rundir import atomic_copy, atomic_write, atomic_write_json

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DataInfo",
    "TokenDataset",
    "prepare_data",
    "token_dtype",
    "unigram_entropy",
    "write_tokens",
]

DEFAULT_MAX_BYTES = 8_000_000  # ~2.4M tokens at V=4096: plenty for a few hundred steps of 16 x 256
META_FILE = "meta.json"
_FORMAT = 2  # 2: stdlib corpus without generated codec tables
_ENCODE_BATCH_BYTES = 1 << 20  # text per encode_batch call: bounds memory, keeps all cores busy


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (at most vocab_size - 1) fits in 16 bits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _text_batches(texts: Iterable[str], max_bytes: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def write_tokens(
    tok: Tokenizer,
    texts: Iterable[str],
    path: str | os.PathLike[str],
    *,
    separate_documents: bool = True,
    separator: int | None = None,
) -> int:
    """Encode texts into the token file ``path`` (+ its ``.json`` sidecar); return the token count.

    Streams: texts are encoded ``encode_batch`` by ``encode_batch`` and appended to a temporary
    file, so only one batch of ids is in memory. The finished file is renamed into place, then
    the sidecar, so a reader never sees a half-written file with a valid sidecar.
    separate_documents appends the separator after every text (False for chunks of one running text):
    ``separator``, default the tokenizer's EOT. The sidecar's ``eot_id`` is that separator (None if none).
    """
    path = Path(path)
    sep = separator if separator is not None else tok.token_to_id(EOT)
    if separate_documents and sep is None:
        raise ValueError(f"tokenizer has no {EOT} token: pass separator=ID, or separate_documents=False")
    vocab_size = max(vocab_extent(tok), 0 if sep is None else sep + 1)
    dtype = token_dtype(vocab_size)
    eot_N = np.array([0 if sep is None else sep], dtype=dtype)
    n = 0

    def write(tmp: Path) -> None:
        nonlocal n
        with tmp.open("wb") as f:
            for batch in _text_batches(texts, _ENCODE_BATCH_BYTES):
                parts: list[np.ndarray] = []
                for enc in tok.encode_batch(batch):
                    parts.append(np.asarray(enc.ids, dtype=dtype))
                    if separate_documents:
                        parts.append(eot_N)
                ids_N = np.concatenate(parts)
                ids_N.tofile(f)
                n += ids_N.size

    atomic_write(path, write)
    meta = {"dtype": dtype.name, "length": n, "vocab_size": vocab_size, "eot_id": sep}
    atomic_write_json(path.with_suffix(".json"), meta, sort_keys=True)
    return n


class TokenDataset:
    """Random and fixed windows over one memory-mapped token file.

    ``get_batch`` draws window offsets from a ``torch.Generator`` only, so a run that saves and
    restores the generator state replays exactly the same batches.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        meta_path = self.path.with_suffix(".json")
        if not self.path.is_file() or not meta_path.is_file():
            raise FileNotFoundError(f"token file {str(self.path)!r} or its sidecar {meta_path.name!r} is "
                                    "missing; build them with write_tokens or prepare_data")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        self.dtype = np.dtype(meta["dtype"])
        self.vocab_size: int = meta["vocab_size"]
        self.eot_id: int | None = meta["eot_id"]  # None: documents were joined without a separator
        length: int = meta["length"]
        size = self.path.stat().st_size
        if size != length * self.dtype.itemsize:
            raise ValueError(f"{str(self.path)!r} has {size} bytes but its sidecar says {length} "
                             f"{self.dtype.name} tokens; the file is stale or truncated")
        if length < 2:
            raise ValueError(f"{str(self.path)!r} has {length} tokens; need at least 2 for (input, label)")
        self.tokens_N = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(length,))

    def __len__(self) -> int:
        return self.tokens_N.shape[0]

    def _check_seq_len(self, seq_len: int) -> None:
        if not 1 <= seq_len < len(self):
            raise ValueError(f"seq_len={seq_len} must be in [1, {len(self) - 1}] for {str(self.path)!r} "
                             f"({len(self)} tokens)")

    def _windows(self, starts_B: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx_BT1 = starts_B[:, None] + np.arange(seq_len + 1)  # (B, T+1)
        window_BT1 = torch.from_numpy(self.tokens_N[idx_BT1].astype(np.int64))
        return window_BT1[:, :-1].contiguous(), window_BT1[:, 1:].contiguous()

    def get_batch(
        self, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: (input_ids (B, T) int64, labels (B, T) int64), labels[:, t] = input_ids[:, t+1].

        Offsets are uniform over [0, N - T - 1], drawn from ``generator`` (a CPU generator).
        """
        self._check_seq_len(seq_len)
        starts_B = torch.randint(0, len(self) - seq_len, (batch_size,), generator=generator)
        return self._windows(starts_B.numpy(), seq_len)

    def num_eval_windows(self, seq_len: int) -> int:
        """How many disjoint windows of T inputs (+1 label) fit in the file."""
        self._check_seq_len(seq_len)
        return (len(self) - 1) // seq_len

    def iter_eval_batches(
        self, batch_size: int, seq_len: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed disjoint windows (same batches every call), as (input_ids, labels) of (B, T) int64.

        Without max_batches every disjoint window is visited in order. With it, at most
        ``max_batches * batch_size`` windows are taken, spread evenly over the whole file so a
        short eval still sees many documents. The last batch may hold fewer than B windows.
        """
        available = self.num_eval_windows(seq_len)
        n = available if max_batches is None else min(available, max_batches * batch_size)
        window_ids = (np.arange(n, dtype=np.int64) * available) // n  # evenly spaced, strictly increasing
        starts = window_ids * seq_len
        for i in range(0, n, batch_size):
            yield self._windows(starts[i : i + batch_size], seq_len)


def unigram_entropy(tokens_N: np.ndarray, vocab_size: int, chunk: int = 1 << 22) -> float:
    """Entropy in nats of the token frequency distribution (a no-context model's best loss)."""
    counts_V = np.zeros(vocab_size, dtype=np.int64)
    for i in range(0, tokens_N.shape[0], chunk):
        counts_V += np.bincount(tokens_N[i : i + chunk], minlength=vocab_size)[:vocab_size]
    p_V = counts_V[counts_V > 0] / counts_V.sum()
    return float(-(p_V * np.log(p_V)).sum())


@dataclass(frozen=True)
class DataInfo:
    """What ``prepare_data`` built. vocab_size is the trained size (may be below the request)."""

    out_dir: Path
    tokenizer_path: Path
    train_path: Path
    val_path: Path
    source: str
    vocab_size: int
    eot_id: int | None  # the document separator; None with a model tokenizer that has none
    train_tokens: int
    val_tokens: int
    train_docs: int
    val_docs: int
    train_bytes: int
    val_bytes: int
    unigram_entropy: float  # nats, of the train tokens
    build_seconds: float  # time of the build (the original one when reused)
    reused: bool = False

    def train_dataset(self) -> TokenDataset:
        return TokenDataset(self.train_path)

    def val_dataset(self) -> TokenDataset:
        return TokenDataset(self.val_path)


_PATH_FIELDS = ("tokenizer_path", "train_path", "val_path")


def _load_reusable(out_dir: Path, request: dict[str, Any]) -> DataInfo | None:
    meta_path = out_dir / META_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("request") != request:
            return None
        info = dict(meta["info"])
        for field in _PATH_FIELDS:
            info[field] = out_dir / info[field]  # stored relative, so the folder can move
        result = DataInfo(out_dir=out_dir, reused=True, **info)
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    if not all(getattr(result, f).is_file() for f in _PATH_FIELDS):
        return None
    return result


class _ModelTokenizer(NamedTuple):
    """A model's own ``tokenizer.json``, opened to encode with instead of training one."""

    path: Path
    tok: Tokenizer
    separator: int | None  # document_separator's choice; None: documents are joined without one
    sha256: str  # of the file's contents, which key the reuse


def _open_model_tokenizer(tokenizer_path: str | os.PathLike[str]) -> _ModelTokenizer:
    src = Path(tokenizer_path)
    src = src / TOKENIZER_FILE if src.is_dir() else src
    if not src.is_file():
        raise FileNotFoundError(f"tokenizer file {str(src)!r} does not exist")
    tok = read_tokenizer_file(src)
    tok.encode_special_tokens = True  # as moekit's own: a document's text never yields a special token
    sep = document_separator(tok, src.parent)
    return _ModelTokenizer(src, tok, sep, hashlib.sha256(src.read_bytes()).hexdigest())


def _tokenizer_for(
    corpus: Corpus, out: Path, vocab_size: int, model: _ModelTokenizer | None
) -> tuple[Tokenizer, int | None, Path]:
    """(tokenizer, document separator, its file in out): trained on the train split, or the model's own."""
    tok_path = out / TOKENIZER_FILE
    if model is None:
        tok = train_tokenizer(corpus.iter_texts("train"), vocab_size, length=len(corpus.train))
        tok_path = save_tokenizer(tok, tok_path)
        return tok, eot_id(tok), tok_path
    if not (tok_path.exists() and tok_path.resolve() == model.path.resolve()):
        atomic_copy(model.path, tok_path)
    return model.tok, model.separator, tok_path


def _save_meta(out: Path, request: dict[str, Any], info: DataInfo) -> None:
    """Write ``meta.json`` (what ``_load_reusable`` reads), its paths relative to out."""
    stored = {k: v for k, v in asdict(info).items() if k not in ("out_dir", "reused")}
    for field in _PATH_FIELDS:
        stored[field] = getattr(info, field).name
    atomic_write_json(out / META_FILE, {"request": request, "info": stored}, sort_keys=True)


def prepare_data(
    out_dir: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    vocab_size: int = 4096,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    seed: int = 0,
    *,
    max_files: int | None = None,
    val_fraction: float = 0.05,
    force: bool = False,
    tokenizer_path: str | os.PathLike[str] | None = None,
) -> DataInfo:
    """Build ``tokenizer.json``, ``train.bin`` and ``val.bin`` (+ sidecars, ``meta.json``) in out_dir.

    data is a ``--data`` path or None for the stdlib corpus (see ``load_corpus``). When out_dir
    already holds a build with the same source and parameters it is reused, not rebuilt; the
    source's contents are not fingerprinted, so pass force=True after editing the data.
    seed salts the split/order hash (0 = the canonical split).

    tokenizer_path: a model's own ``tokenizer.json`` (or the directory holding it) to encode with instead
    of training a BPE; vocab_size is then ignored. It is copied into out_dir, documents are separated as
    ``document_separator(tok, its directory)`` says, and its contents (not its path) key the reuse.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    request = {"format": _FORMAT, "source": source_id(data), "vocab_size": vocab_size,
               "max_bytes": max_bytes, "max_files": max_files, "val_fraction": val_fraction, "seed": seed}
    model = None if tokenizer_path is None else _open_model_tokenizer(tokenizer_path)
    if model is not None:
        request |= {"vocab_size": None, "tokenizer": {"sha256": model.sha256, "separator": model.separator}}
    if not force and (reused := _load_reusable(out, request)) is not None:
        return reused
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # meta.json is written last: its presence means complete

    # 1. scan the corpus (document references only) and train the tokenizer on the train split (or copy
    #    the model's own, byte for byte)
    corpus = load_corpus(data, val_fraction, max_bytes, max_files, seed)
    tok, sep, tok_path = _tokenizer_for(corpus, out, vocab_size, model)
    # 2. stream both splits into token files
    paths = {split: out / f"{split}.bin" for split in ("train", "val")}
    separate = corpus.separate_documents and sep is not None
    counts = {split: write_tokens(tok, corpus.iter_texts(split), p, separate_documents=separate, separator=sep)
              for split, p in paths.items()}
    # 3. the no-context baseline that validation loss should fall well below
    vocab = TokenDataset(paths["train"]).vocab_size
    entropy = unigram_entropy(TokenDataset(paths["train"]).tokens_N, vocab)
    info = DataInfo(
        out_dir=out, tokenizer_path=tok_path, train_path=paths["train"], val_path=paths["val"],
        source=corpus.source, vocab_size=vocab, eot_id=sep,
        train_tokens=counts["train"], val_tokens=counts["val"],
        train_docs=len(corpus.train), val_docs=len(corpus.val),
        train_bytes=corpus.num_bytes("train"), val_bytes=corpus.num_bytes("val"),
        unigram_entropy=entropy, build_seconds=time.perf_counter() - t0,
    )
    _save_meta(out, request, info)
    return info
