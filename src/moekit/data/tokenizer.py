"""Byte-level BPE tokenizer (the ``tokenizers`` library), trained on a corpus's train split.

Byte-level means every string, in any script, encodes losslessly: ``decode(encode(s)) == s``.
The special token ``<|endoftext|>`` (EOT) separates documents in the token files. It is never
produced from text: tokenizers load with ``encode_special_tokens = True`` so a literal
"<|endoftext|>" in a document is encoded as ordinary bytes, and only the writer inserts the EOT
id between documents. This keeps the round trip exact for every input.
"""

from __future__ import annotations

import io
import json
import os
import tokenize
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moekit.rundir import CONFIG_FILE, HF_CONFIG_FILE, TOKENIZER_FILE, DamagedFileError, atomic_write

__all__ = [
    "read_tokenizer_file",
    "CODE_KINDS",
    "EOT",
    "MIN_VOCAB_SIZE",
    "TOKENIZER_FILE",
    "decode",
    "document_separator",
    "encode",
    "eot_id",
    "load_tokenizer",
    "python_char_kinds",
    "save_tokenizer",
    "token_kinds",
    "train_tokenizer",
    "vocab_extent",
]

EOT = "<|endoftext|>"
MIN_VOCAB_SIZE = 257  # 256 byte symbols + EOT


def _configure(tok: Tokenizer) -> Tokenizer:
    # not stored in tokenizer.json, so set on every construction path
    tok.encode_special_tokens = True
    return tok


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    *,
    min_frequency: int = 2,
    length: int | None = None,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on an iterable of documents (streamed, not held in memory).

    The vocabulary holds the 256 byte symbols, EOT (id 0) and up to ``vocab_size - 257`` merges;
    a small corpus may give fewer (read the real size from ``get_vocab_size()``). length is only
    a hint for ``tokenizers``' progress accounting.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} must be >= {MIN_VOCAB_SIZE} (256 bytes + {EOT})")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a prefix space would not survive decoding, breaking the round trip
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return _configure(tok)


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike[str]) -> Path:
    """Write ``tokenizer.json`` atomically; path is a file or a run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    return atomic_write(path, tok.to_str())


def read_tokenizer_file(path: str | os.PathLike[str]) -> Tokenizer:
    """``Tokenizer.from_file``, with a damaged file named instead of a Rust parse error."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DamagedFileError(f"{path}: cannot be read as a tokenizer ({reason}); the file is damaged: copy "
                               "it again from the run or model it came from") from None


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer from a ``tokenizer.json`` file or a run directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist; expected a {TOKENIZER_FILE} "
                                "or a run directory holding one")
    tok = read_tokenizer_file(path)
    if tok.token_to_id(EOT) is None:
        raise ValueError(f"tokenizer {str(path)!r} has no {EOT} token; it was not made by train_tokenizer")
    return _configure(tok)


def eot_id(tok: Tokenizer) -> int:
    """The id of the document separator."""
    i = tok.token_to_id(EOT)
    if i is None:
        raise ValueError(f"tokenizer has no {EOT} token")
    return i


def vocab_extent(tok: Tokenizer) -> int:
    """1 + the largest id the tokenizer can produce (added tokens included): the smallest vocab_size that holds it."""
    return max(tok.get_vocab_size(), max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1)


def _json_or_empty(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return d if isinstance(d, dict) else {}


def document_separator(tok: Tokenizer, model_dir: str | os.PathLike[str] | None = None) -> int | None:
    """The id that ends each document in the token files of a model's own tokenizer (``None`` = none).

    1. the tokenizer's EOT ``<|endoftext|>`` when it has one (every moekit tokenizer does);
    2. else the model's end-of-sequence token from ``model_dir``: ``eos_token`` of tokenizer_config.json,
       else ``eos_token_id`` of config.json, else of hf_config.json (the HF config ``moekit convert`` and
       ``moekit train --init-from`` keep beside a moekit config.json); a list of ids gives its first;
    3. else None: documents are concatenated without a separator.
    """
    i = tok.token_to_id(EOT)
    if i is not None or model_dir is None:
        return i
    d = Path(model_dir)
    eos = _json_or_empty(d / "tokenizer_config.json").get("eos_token")
    if isinstance(eos, dict):  # a serialised AddedToken
        eos = eos.get("content")
    if isinstance(eos, str) and (i := tok.token_to_id(eos)) is not None:
        return i
    for name in (CONFIG_FILE, HF_CONFIG_FILE):
        v = _json_or_empty(d / name).get("eos_token_id")
        v = v[0] if isinstance(v, list) and v else v
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return v
    return None


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of one string (no EOT added)."""
    return tok.encode(text).ids


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
    """The text of token ids; an EOT id decodes to the literal "<|endoftext|>"."""
    return tok.decode(list(ids), skip_special_tokens=False)


# ---------------------------------------------------------------- kinds of Python source

CODE_KINDS = ("code", "comment/docstring", "string", "whitespace")
# f-string pieces exist from Python 3.12; on 3.11 an f-string is one STRING token
_STRING_TYPES = {tokenize.STRING} | {getattr(tokenize, n) for n in ("FSTRING_START", "FSTRING_MIDDLE",
                                                                     "FSTRING_END") if hasattr(tokenize, n)}
_STATEMENT_START = {tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING}
_TRIVIA = {tokenize.NL, tokenize.COMMENT}


def python_char_kinds(source: str) -> list[str]:
    """The kind (one of CODE_KINDS) of every character of Python source.

    Comments and string statements (docstrings, and bare strings used as comments) are
    "comment/docstring"; other string literals are "string"; outside those, whitespace characters
    are "whitespace" and everything else "code". Source that does not tokenize (a truncated
    snippet) is classified up to the error, and by whitespace/code after it.
    """
    kinds = ["whitespace" if c.isspace() else "code" for c in source]
    line_starts = [0]
    for line in io.StringIO(source).readlines():
        line_starts.append(line_starts[-1] + len(line))
    toks: list[tokenize.TokenInfo] = []
    try:
        toks.extend(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        pass  # keep the tokens read before the error
    significant = [t for t in toks if t.type not in _TRIVIA]
    docstrings = set()
    # 1. a string statement: its previous significant token ends a statement and the next ends one
    for i, t in enumerate(significant):
        prev_ok = i == 0 or significant[i - 1].type in _STATEMENT_START
        next_ok = i + 1 == len(significant) or significant[i + 1].type in (tokenize.NEWLINE, tokenize.ENDMARKER)
        if t.type == tokenize.STRING and prev_ok and next_ok:
            docstrings.add(t.start)
    # 2. paint comment and string spans over the whitespace/code default
    for t in toks:
        if t.type == tokenize.COMMENT or t.start in docstrings:
            kind = "comment/docstring"
        elif t.type in _STRING_TYPES:
            kind = "string"
        else:
            continue
        start = line_starts[t.start[0] - 1] + t.start[1]
        end = line_starts[t.end[0] - 1] + t.end[1]
        kinds[start:end] = [kind] * (end - start)
    return kinds


def token_kinds(tok: Tokenizer, source: str) -> list[str]:
    """The kind of each token of ``encode(tok, source)``: the kind of most of its characters."""
    char_kinds = python_char_kinds(source)
    result = []
    for start, end in tok.encode(source).offsets:
        span = char_kinds[start:end] or char_kinds[start : start + 1] or ["whitespace"]
        result.append(Counter(span).most_common(1)[0][0])
    return result
