"""Text corpora: the running Python's standard library, or a user ``--data`` path.

A corpus is a list of *document references* (path + byte span), not of texts, so a corpus larger
than RAM can be scanned once and then streamed document by document (``Corpus.iter_texts``).

Splitting and sampling are deterministic and independent of the file system's listing order:
each document has a string key (the path relative to the corpus root, or for ``.jsonl`` the
content of its ``"text"`` field) whose sha256 digest decides

1. the split: bytes 0..8 as a fraction in [0, 1); below ``val_fraction`` means validation;
2. the order: bytes 8..16, so a ``max_bytes`` / ``max_files`` cap takes a varied sample of the
   corpus, not only the alphabetically first modules.

Each split has its own budget (``val_fraction`` of the caps goes to validation), so a document's
split never depends on the cap. A single text file is split by lines instead (the last
``val_fraction`` of its lines are validation) and is streamed in chunks that are not documents.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "STDLIB_EXCLUDED_DIRS",
    "TEXT_EXTENSIONS",
    "Corpus",
    "DocRef",
    "Split",
    "load_corpus",
    "source_id",
    "split_of",
    "stdlib_corpus",
]

Split = Literal["train", "val"]

# Directory names skipped anywhere below the stdlib root: test suites (test/, tests/,
# idlelib/idle_test/, lib2to3/tests/, ...), installed third-party packages and build artefacts.
STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib-dynload", "__pycache__"}
)
# Extensions read as text in a --data folder; other files are kept if they look like UTF-8 text.
TEXT_EXTENSIONS = frozenset({".txt", ".md", ".rst", ".py", ".json", ".csv", ".tex", ".html", ".xml", ".yaml",
                             ".yml", ".toml", ".ini", ".cfg", ".c", ".h", ".cpp", ".rs", ".js", ".ts", ".sh"})
_SNIFF_BYTES = 8192
_CHUNK_BYTES = 1 << 16  # single-text-file chunk size; chunks end at line boundaries


@dataclass(frozen=True)
class DocRef:
    """Where one document (or one chunk of a single text file) lives.

    kind: "file" = the whole file; "jsonl" = the "text" field of the JSON line at bytes
    [start, stop); "span" = the raw bytes [start, stop) of a text file (ends on a line boundary).
    """

    path: Path
    kind: Literal["file", "jsonl", "span"]
    start: int = 0
    stop: int = -1
    nbytes: int = 0  # size used for the max_bytes budget (file size / UTF-8 length of the text)

    def read(self) -> str:
        """The document's text (UTF-8, undecodable bytes replaced by U+FFFD)."""
        if self.kind == "file":
            return self.path.read_text(encoding="utf-8", errors="replace")
        with self.path.open("rb") as f:
            f.seek(self.start)
            raw = f.read(self.stop - self.start)
        if self.kind == "span":
            return raw.decode("utf-8", errors="replace")
        return json.loads(raw.decode("utf-8", errors="replace"))["text"]


@dataclass(frozen=True)
class Corpus:
    """A deterministic train/val split of documents, read lazily.

    separate_documents: True when every DocRef is its own document (a separator token goes
    between them); False for the chunks of a single text file, which form one running text.
    """

    source: str
    train: tuple[DocRef, ...]
    val: tuple[DocRef, ...]
    separate_documents: bool = True

    def docs(self, split: Split) -> tuple[DocRef, ...]:
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} must be 'train' or 'val'")
        return self.train if split == "train" else self.val

    def iter_texts(self, split: Split) -> Iterator[str]:
        """Yield the texts of one split in corpus order, one file read at a time."""
        for doc in self.docs(split):
            yield doc.read()

    def num_bytes(self, split: Split) -> int:
        return sum(d.nbytes for d in self.docs(split))


def _digest(key: str, seed: int) -> bytes:
    # seed 0 hashes the bare key, so the canonical split is "sha256 of the relative path".
    salted = key if seed == 0 else f"{seed}:{key}"
    return hashlib.sha256(salted.encode("utf-8", errors="surrogatepass")).digest()


def split_of(key: str, val_fraction: float, seed: int = 0) -> Split:
    """The split of a document key: stable across runs, machines and Python versions."""
    u = int.from_bytes(_digest(key, seed)[:8], "big") / 2**64
    return "val" if u < val_fraction else "train"


def _check_caps(val_fraction: float, max_bytes: int | None, max_files: int | None) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes} must be positive or None")
    if max_files is not None and max_files < 2:
        raise ValueError(f"max_files={max_files} must be >= 2 (one train and one val document) or None")


def _select(
    keyed: list[tuple[str, DocRef]],
    source: str,
    val_fraction: float,
    max_bytes: int | None,
    max_files: int | None,
    seed: int,
) -> Corpus:
    """Split keyed documents by hash, order them by hash and fill each split's budget."""
    # 1. order by the second half of the digest (the key breaks exact ties)
    ordered = sorted(keyed, key=lambda kd: (_digest(kd[0], seed)[8:16], kd[0]))
    # 2. per-split budgets, so the cap never moves a document between splits
    budgets: dict[Split, tuple[float, float]] = {}
    for split, frac in (("val", val_fraction), ("train", 1.0 - val_fraction)):
        b = float("inf") if max_bytes is None else max_bytes * frac
        n = float("inf") if max_files is None else max(1, round(max_files * frac))
        budgets[split] = (b, n)
    # 3. walk in order; a document that would overflow its byte budget is skipped (a smaller one
    #    later may still fit), so tiny caps still yield documents of both splits
    chosen: dict[Split, list[DocRef]] = {"train": [], "val": []}
    used = {"train": 0, "val": 0}
    for key, doc in ordered:
        split = split_of(key, val_fraction, seed)
        max_b, max_n = budgets[split]
        if len(chosen[split]) >= max_n or used[split] + doc.nbytes > max_b:
            continue
        chosen[split].append(doc)
        used[split] += doc.nbytes
    for split in ("train", "val"):
        if not chosen[split]:
            raise ValueError(
                f"corpus {source!r} has no {split} documents: {len(keyed)} document(s) found, each assigned "
                f"to train or val by a hash of its name ({val_fraction:.0%} val)"
                + (f", at most {max_bytes:,} bytes read (--max-data-bytes)" if max_bytes else "")
                + "; add more documents (files, or .jsonl lines)"
                + (" or raise --max-data-bytes" if max_bytes else "")
            )
    return Corpus(source, tuple(chosen["train"]), tuple(chosen["val"]))


def _is_excluded(rel_parts: tuple[str, ...]) -> bool:
    return any(p in STDLIB_EXCLUDED_DIRS for p in rel_parts)


def is_generated_codec(path: Path) -> bool:
    """A codec table generated by gencodec.py (``encodings/cp1252.py`` and ~65 others): mechanical
    256-entry tables, easy to predict, that would dominate a small split and flatter its loss."""
    with open(path, "rb") as f:
        return b"gencodec.py" in f.read(1024)


def source_id(data: str | os.PathLike[str] | None) -> str:
    """The name a corpus records as its source: "stdlib:<root>" or the resolved --data path."""
    if data is None:
        return f"stdlib:{sysconfig.get_paths()['stdlib']}"
    return str(Path(data).expanduser().resolve())


def stdlib_corpus(
    val_fraction: float = 0.05,
    max_bytes: int | None = None,
    max_files: int | None = None,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
) -> Corpus:
    """The ``.py`` sources of the running Python's standard library, test suites and generated codec
    tables (``encodings/cp*.py`` etc., see ``is_generated_codec``) excluded.

    root defaults to ``sysconfig.get_paths()["stdlib"]``; keys are POSIX paths relative to it.
    """
    _check_caps(val_fraction, max_bytes, max_files)
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    source = f"stdlib:{base}"
    if not base.is_dir():
        raise FileNotFoundError(f"stdlib directory {str(base)!r} does not exist")
    keyed = []
    for dirpath, dirnames, filenames in os.walk(base):
        # prune in place so os.walk never descends into test suites or site-packages
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS)
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = Path(dirpath, name)
            rel = path.relative_to(base)
            size = path.stat().st_size
            if size > 0 and not _is_excluded(rel.parts):
                if rel.parts[0] == "encodings" and is_generated_codec(path):
                    continue
                keyed.append((rel.as_posix(), DocRef(path, "file", nbytes=size)))
    return _select(keyed, source, val_fraction, max_bytes, max_files, seed)


def _jsonl_docs(path: Path, key_prefix: str = "") -> list[tuple[str, DocRef]]:
    """One DocRef per non-blank line; every line must be a JSON object with a string "text"."""
    keyed = []
    offset = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8", errors="replace"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one "
                                 'object per line like {"text": "..."}') from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                # ValueError, not TypeError: the data file is malformed, not the caller's argument
                raise ValueError(f'{path}:{lineno}: expected a JSON object with a string "text" field')  # noqa: TRY004
            text = obj["text"]
            if text.strip():
                # keyed by content, so exact duplicates always land in the same split
                keyed.append((key_prefix + text, DocRef(path, "jsonl", start, offset, len(text.encode()))))
    return keyed


def _looks_like_text(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(_SNIFF_BYTES)
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        # a multi-byte character cut at the sniff boundary is still text
        return e.start >= len(head) - 3 and len(head) == _SNIFF_BYTES
    return True


def _folder_docs(root: Path) -> list[tuple[str, DocRef]]:
    keyed = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if name.startswith(".") or not path.is_file():
                continue
            if name.endswith(".jsonl"):
                keyed.extend(_jsonl_docs(path, key_prefix=f"{rel}:"))
                continue
            size = path.stat().st_size
            if size > 0 and (path.suffix.lower() in TEXT_EXTENSIONS or _looks_like_text(path)):
                keyed.append((rel, DocRef(path, "file", nbytes=size)))
    return keyed


def _text_file_corpus(path: Path, val_fraction: float, max_bytes: int | None) -> Corpus:
    """Lines [0, n_train) are train, the rest val; both streamed as ~64 KiB line-aligned chunks.

    max_bytes keeps a prefix of each split's lines (``val_fraction`` of it for val).
    """
    with path.open("rb") as f:
        n_lines = sum(1 for _ in f)
    n_train = n_lines - (max(1, round(n_lines * val_fraction)) if n_lines >= 2 else 0)
    budget = {"train": float("inf"), "val": float("inf")}
    if max_bytes is not None:
        budget = {"train": max_bytes * (1 - val_fraction), "val": max_bytes * val_fraction}
    chunks: dict[Split, list[DocRef]] = {"train": [], "val": []}
    used = {"train": 0, "val": 0}
    full = {"train": False, "val": False}
    chunk: tuple[Split, int] | None = None  # (split, start offset) of the open chunk
    offset = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f):
            split: Split = "train" if lineno < n_train else "val"
            full[split] = full[split] or used[split] + len(raw) > budget[split]
            # close the open chunk at a split change, at the budget, or when it is big enough
            if chunk is not None and (chunk[0] != split or full[split] or offset - chunk[1] >= _CHUNK_BYTES):
                chunks[chunk[0]].append(DocRef(path, "span", chunk[1], offset, offset - chunk[1]))
                chunk = None
            if full["val"]:
                break
            if not full[split]:
                chunk = chunk or (split, offset)
                used[split] += len(raw)
            offset += len(raw)
    if chunk is not None:
        chunks[chunk[0]].append(DocRef(path, "span", chunk[1], offset, offset - chunk[1]))
    for s in ("train", "val"):
        if not chunks[s]:
            raise ValueError(f"text file {str(path)!r} gives no {s} text ({n_lines} lines, "
                             f"{val_fraction:.0%} of them for val"
                             + (f", at most {max_bytes:,} bytes read" if max_bytes else "")
                             + "): it needs at least 2 lines"
                             + (", and --max-data-bytes larger than its first line" if max_bytes else ""))
    return Corpus(str(path), tuple(chunks["train"]), tuple(chunks["val"]), separate_documents=False)


def load_corpus(
    data: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.05,
    max_bytes: int | None = None,
    max_files: int | None = None,
    seed: int = 0,
) -> Corpus:
    """The corpus named by ``--data``: None (stdlib), a text file, a ``.jsonl`` file or a folder.

    max_files applies to documents (folder files or jsonl lines); a single text file is capped
    by max_bytes only. Raises FileNotFoundError for a missing path and ValueError for an empty
    corpus or malformed ``.jsonl``.
    """
    if data is None:
        return stdlib_corpus(val_fraction, max_bytes, max_files, seed)
    _check_caps(val_fraction, max_bytes, max_files)
    path = Path(source_id(data))
    if not path.exists():
        raise FileNotFoundError(f"--data {str(data)!r}: no such file or directory; expected a text file, "
                                "a .jsonl file with a \"text\" field per line, or a folder of text files")
    if path.is_dir():
        keyed = _folder_docs(path)
        if not keyed:
            raise ValueError(f"--data folder {str(path)!r} contains no non-empty text files")
        return _select(keyed, str(path), val_fraction, max_bytes, max_files, seed)
    if path.suffix.lower() == ".jsonl":
        keyed = _jsonl_docs(path)
        if not keyed:
            raise ValueError(f"--data {str(path)!r}: no non-blank \"text\" values in this .jsonl file")
        return _select(keyed, str(path), val_fraction, max_bytes, max_files, seed)
    if path.stat().st_size == 0:
        raise ValueError(f"--data text file {str(path)!r} is empty")
    return _text_file_corpus(path, val_fraction, max_bytes)
