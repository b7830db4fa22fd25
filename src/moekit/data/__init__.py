"""Corpora, the byte-level BPE tokenizer and memory-mapped token batches.

``prepare_data(out_dir)`` builds everything a training run needs from the standard library (or a
``--data`` path); ``TokenDataset`` samples reproducible batches from the result.
"""

from moekit.data.corpus import Corpus, DocRef, load_corpus, split_of, stdlib_corpus
from moekit.data.dataset import (
    DEFAULT_MAX_BYTES,
    DataInfo,
    TokenDataset,
    prepare_data,
    token_dtype,
    unigram_entropy,
    write_tokens,
)
from moekit.data.tokenizer import (
    CODE_KINDS,
    EOT,
    decode,
    document_separator,
    encode,
    eot_id,
    load_tokenizer,
    python_char_kinds,
    save_tokenizer,
    token_kinds,
    train_tokenizer,
    vocab_extent,
)

__all__ = [
    "CODE_KINDS",
    "DEFAULT_MAX_BYTES",
    "EOT",
    "Corpus",
    "DataInfo",
    "DocRef",
    "TokenDataset",
    "decode",
    "document_separator",
    "encode",
    "eot_id",
    "load_corpus",
    "load_tokenizer",
    "prepare_data",
    "python_char_kinds",
    "save_tokenizer",
    "split_of",
    "stdlib_corpus",
    "token_dtype",
    "token_kinds",
    "train_tokenizer",
    "unigram_entropy",
    "vocab_extent",
    "write_tokens",
]
