"""Tests for moekit.data: corpora, tokenizer, token files, batch sampling and prepare_data."""

from __future__ import annotations

import functools
import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.data import (
    EOT,
    TokenDataset,
    decode,
    encode,
    eot_id,
    load_corpus,
    load_tokenizer,
    prepare_data,
    python_char_kinds,
    save_tokenizer,
    split_of,
    stdlib_corpus,
    token_dtype,
    token_kinds,
    train_tokenizer,
    unigram_entropy,
    write_tokens,
)
from moekit.data.corpus import STDLIB_EXCLUDED_DIRS

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMALL = 150_000  # bytes: a few dozen stdlib files, trains a 400-token vocabulary in ~0.1 s


@functools.cache
def small_tokenizer():
    """One tokenizer shared by the tests (hypothesis forbids function-scoped fixtures)."""
    return train_tokenizer(stdlib_corpus(max_bytes=SMALL).iter_texts("train"), vocab_size=400)


def rel(corpus_docs, root: Path) -> list[str]:
    return [d.path.relative_to(root).as_posix() for d in corpus_docs]


# ---------------------------------------------------------------- stdlib corpus


@pytest.fixture
def fake_stdlib(tmp_path: Path) -> Path:
    files = {
        "os.py": "import sys\n", "json/__init__.py": "x = 1\n", "json/decoder.py": "y = 2\n",
        "test/test_os.py": "bad\n", "unittest/test/test_case.py": "bad\n", "distutils/tests/t.py": "bad\n",
        "idlelib/idle_test/test_x.py": "bad\n", "idlelib/editor.py": "z = 3\n",
        "site-packages/pkg/mod.py": "bad\n", "lib2to3/tests/data/f.py": "bad\n", "README.txt": "not py\n",
        "empty.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    for i in range(40):
        (tmp_path / f"mod{i:02d}.py").write_text(f"value_{i} = {i}\n" * (i + 1))
    return tmp_path


def test_stdlib_corpus_excludes_tests_and_non_py(fake_stdlib: Path) -> None:
    c = stdlib_corpus(root=fake_stdlib)
    names = set(rel(c.train + c.val, fake_stdlib))
    assert {"os.py", "json/__init__.py", "json/decoder.py", "idlelib/editor.py"} <= names
    assert not any("test" in n.split("/")[:-1] or "tests" in n or "site-packages" in n for n in names)
    assert "README.txt" not in names and "empty.py" not in names
    assert len(names) == 4 + 40


def test_real_stdlib_corpus_split_is_hash_of_relative_path() -> None:
    c = stdlib_corpus()
    train, val = rel(c.train, STDLIB), rel(c.val, STDLIB)
    assert not set(train) & set(val)
    assert all(split_of(n, 0.05) == "train" for n in train) and all(split_of(n, 0.05) == "val" for n in val)
    assert not any(set(Path(n).parts) & STDLIB_EXCLUDED_DIRS for n in train + val)
    assert "json/decoder.py" in train + val
    assert 0.01 < len(val) / (len(train) + len(val)) < 0.12
    again = stdlib_corpus()
    assert (again.train, again.val) == (c.train, c.val)


def test_split_of_is_stable_and_salted() -> None:
    # a fixed key must keep its split forever (sha256, not the salted builtin hash())
    keys = [f"pkg/mod{i}.py" for i in range(2000)]
    splits = [split_of(k, 0.05) for k in keys]
    assert 40 < splits.count("val") < 170
    assert splits == [split_of(k, 0.05) for k in keys]
    assert splits != [split_of(k, 0.05, seed=1) for k in keys]


def test_caps_sample_varied_files_without_moving_splits() -> None:
    full = stdlib_corpus()
    full_split = {d.path: "train" for d in full.train} | {d.path: "val" for d in full.val}
    capped = stdlib_corpus(max_bytes=400_000)
    assert capped.num_bytes("train") <= 400_000 * 0.95 and capped.num_bytes("val") <= 400_000 * 0.05
    assert capped.train and capped.val
    assert all(full_split[d.path] == "train" for d in capped.train)
    assert all(full_split[d.path] == "val" for d in capped.val)
    # hash order, not alphabetical: the sample spans many packages
    top_level = {Path(n).parts[0] for n in rel(capped.train, STDLIB)}
    assert len(top_level) > 10
    by_files = stdlib_corpus(max_files=20)
    assert len(by_files.train) + len(by_files.val) == 20 and len(by_files.val) == 1


def test_bad_caps_raise() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        stdlib_corpus(val_fraction=0.0)
    with pytest.raises(ValueError, match="max_bytes"):
        stdlib_corpus(max_bytes=0)


# ---------------------------------------------------------------- --data forms


def test_text_file_splits_last_lines_into_val(tmp_path: Path) -> None:
    lines = [f"line {i} é 日本\n" for i in range(10_000)]  # ~170 KB: several 64 KiB chunks
    path = tmp_path / "book.txt"
    path.write_text("".join(lines), encoding="utf-8")
    c = load_corpus(path)
    assert not c.separate_documents and len(c.train) > 1
    train, val = "".join(c.iter_texts("train")), "".join(c.iter_texts("val"))
    assert train + val == path.read_text(encoding="utf-8")
    assert val == "".join(lines[-500:])
    capped = load_corpus(path, max_bytes=20_000)
    assert capped.num_bytes("train") <= 19_000 and capped.num_bytes("val") <= 1_000
    assert "".join(capped.iter_texts("train")) == train[: len("".join(capped.iter_texts("train")))]
    assert "".join(capped.iter_texts("val")).startswith(lines[-500])


def test_folder_is_recursive_and_skips_binary_and_hidden(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    docs = {f"sub/doc{i}.md": f"# doc {i}\n" for i in range(30)}
    docs |= {"a.txt": "plain text\n", "sub/deeper/code.py": "print(1)\n", "NOTES": "no extension but text\n"}
    for name, text in docs.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / ".git" / "HEAD.txt").write_text("hidden\n")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")  # latin-1 in a .txt: kept, decoded with U+FFFD
    c = load_corpus(tmp_path)
    names = rel(c.train, tmp_path) + rel(c.val, tmp_path)
    assert sorted(names) == sorted([*docs, "bad.txt"])
    assert all(split_of(n, 0.05) == "train" for n in rel(c.train, tmp_path))
    texts = dict(zip(names, [*c.iter_texts("train"), *c.iter_texts("val")], strict=True))
    assert texts["bad.txt"] == "caf\ufffd\n" and texts["sub/deeper/code.py"] == "print(1)\n"


def test_jsonl_documents(tmp_path: Path) -> None:
    texts = [f"document number {i}\nwith ünïcode {'x' * i}" for i in range(60)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n\n")
    c = load_corpus(path, max_files=None)
    got = list(c.iter_texts("train")) + list(c.iter_texts("val"))
    assert sorted(got) == sorted(texts) and c.separate_documents
    assert set(c.iter_texts("val")) == {t for t in texts if split_of(t, 0.05) == "val"}


@pytest.mark.parametrize(
    ("name", "content", "error", "match"),
    [
        ("missing.txt", None, FileNotFoundError, "missing.txt.*no such file"),
        ("empty.txt", "", ValueError, "empty"),
        ("one_line.txt", "only one line\n", ValueError, "at least 2 lines"),
        ("no_text.jsonl", '{"text": "ok"}\n{"body": "x"}\n', ValueError, r"no_text.jsonl:2.*\"text\""),
        ("not_json.jsonl", '{"text": "ok"}\nnot json\n', ValueError, r"not_json.jsonl:2.*not valid JSON"),
        ("blank.jsonl", '{"text": "  "}\n', ValueError, "no non-blank"),
        ("emptydir", "DIR", ValueError, "no non-empty text files"),
    ],
)
def test_bad_data_paths_raise_clear_errors(tmp_path: Path, name, content, error, match) -> None:
    path = tmp_path / name
    if content == "DIR":
        path.mkdir()
        (path / "blob.bin").write_bytes(b"\x00\x00")
    elif content is not None:
        path.write_text(content)
    with pytest.raises(error, match=match):
        load_corpus(path)


# ---------------------------------------------------------------- tokenizer


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_tokenizer_round_trip_is_exact(text: str) -> None:
    tok = small_tokenizer()
    ids = encode(tok, text)
    assert decode(tok, ids) == text
    assert eot_id(tok) not in ids or text == ""


@pytest.mark.parametrize("text", ["", " lead", "a<|endoftext|>b", "\r\n\t\x00", "日本語 🎉 é\u0301", "  \n\n  x"])
def test_tokenizer_round_trip_examples(text: str) -> None:
    tok = small_tokenizer()
    assert decode(tok, encode(tok, text)) == text


def test_tokenizer_save_load(tmp_path: Path) -> None:
    tok = small_tokenizer()
    assert tok.get_vocab_size() == 400 and eot_id(tok) == 0
    path = save_tokenizer(tok, tmp_path)
    assert path == tmp_path / "tokenizer.json"
    for loaded in (load_tokenizer(tmp_path), load_tokenizer(path)):
        sample = "def f(x):\n    return x  # <|endoftext|>\n"
        assert encode(loaded, sample) == encode(tok, sample)
        assert eot_id(loaded) not in encode(loaded, sample)  # literal EOT text stays text after loading
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(["abc"], vocab_size=100)


# ---------------------------------------------------------------- token files and batches


def test_token_dtype() -> None:
    assert token_dtype(4096) == np.uint16 and token_dtype(2**16) == np.uint16
    assert token_dtype(2**16 + 1) == np.uint32


@pytest.fixture
def token_file(tmp_path: Path) -> tuple[Path, list[int]]:
    tok = small_tokenizer()
    docs = [f"def function_{i}(x):\n    return x * {i}\n" * (1 + i % 3) for i in range(200)]
    path = tmp_path / "train.bin"
    n = write_tokens(tok, docs, path)
    expected = [t for d in docs for t in [*encode(tok, d), eot_id(tok)]]
    assert n == len(expected)
    return path, expected


def test_write_tokens_matches_direct_encoding(token_file, tmp_path: Path) -> None:
    path, expected = token_file
    ds = TokenDataset(path)
    assert ds.tokens_N.dtype == np.uint16 and len(ds) == len(expected)
    np.testing.assert_array_equal(np.asarray(ds.tokens_N), np.asarray(expected))
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta == {"dtype": "uint16", "length": len(expected), "vocab_size": 400, "eot_id": 0}
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    no_sep = write_tokens(small_tokenizer(), ["ab", "cd"], tmp_path / "x.bin", separate_documents=False)
    assert 0 not in TokenDataset(tmp_path / "x.bin").tokens_N[:no_sep]


def test_token_dataset_rejects_truncated_file(token_file) -> None:
    path, _ = token_file
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="stale or truncated"):
        TokenDataset(path)


def test_get_batch_shifted_labels_and_reproducible(token_file) -> None:
    path, expected = token_file
    ds = TokenDataset(path)
    B, T = 8, 32
    x_BT, y_BT = ds.get_batch(B, T, torch.Generator().manual_seed(123))
    assert x_BT.shape == y_BT.shape == (B, T) and x_BT.dtype == y_BT.dtype == torch.int64
    torch.testing.assert_close(x_BT[:, 1:], y_BT[:, :-1])
    # every row is the window of the file at the offset drawn from the generator
    starts = torch.randint(0, len(ds) - T, (B,), generator=torch.Generator().manual_seed(123))
    tokens = torch.tensor(expected)
    for b, s in enumerate(starts.tolist()):
        torch.testing.assert_close(x_BT[b], tokens[s : s + T])
        torch.testing.assert_close(y_BT[b], tokens[s + 1 : s + T + 1])
    x2, y2 = ds.get_batch(B, T, torch.Generator().manual_seed(123))
    assert torch.equal(x2, x_BT) and torch.equal(y2, y_BT)
    assert not torch.equal(ds.get_batch(B, T, torch.Generator().manual_seed(124))[0], x_BT)
    # resume: restoring the generator state replays the next batch exactly
    g = torch.Generator().manual_seed(7)
    ds.get_batch(B, T, g)
    state = g.get_state()
    nxt = ds.get_batch(B, T, g)[0]
    g.set_state(state)
    assert torch.equal(ds.get_batch(B, T, g)[0], nxt)
    with pytest.raises(ValueError, match="seq_len"):
        ds.get_batch(B, len(ds), g)


def test_eval_batches_are_fixed_disjoint_windows(token_file) -> None:
    path, expected = token_file
    ds = TokenDataset(path)
    T = 16
    all_x = torch.cat([x for x, _ in ds.iter_eval_batches(5, T)])
    assert all_x.shape == (ds.num_eval_windows(T), T) == ((len(expected) - 1) // T, T)
    torch.testing.assert_close(all_x.flatten(), torch.tensor(expected[: all_x.numel()]))
    limited = list(ds.iter_eval_batches(4, T, max_batches=3))
    assert len(limited) == 3 and all(x.shape == (4, T) for x, _ in limited)
    again = list(ds.iter_eval_batches(4, T, max_batches=3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(limited, again, strict=True))
    x_last, y_last = limited[-1]
    torch.testing.assert_close(x_last[:, 1:], y_last[:, :-1])
    # the 12 windows are spread evenly over the file, not its first 12 windows
    available = ds.num_eval_windows(T)
    want_starts = [(i * available // 12) * T for i in range(12)]
    assert want_starts[-1] > 12 * T
    tokens = torch.tensor(expected)
    want = torch.stack([tokens[s : s + T] for s in want_starts])
    torch.testing.assert_close(torch.cat([x for x, _ in limited]), want)


def test_unigram_entropy() -> None:
    assert unigram_entropy(np.array([0, 1, 0, 1], dtype=np.uint16), 4) == pytest.approx(math.log(2))
    assert unigram_entropy(np.array([3, 3, 3], dtype=np.uint16), 4) == 0.0
    uniform = np.arange(400, dtype=np.uint16).repeat(3)
    assert unigram_entropy(uniform, 400, chunk=7) == pytest.approx(math.log(400))


# ---------------------------------------------------------------- prepare_data


def test_prepare_data_builds_and_reuses(tmp_path: Path) -> None:
    out = tmp_path / "run"
    info = prepare_data(out, vocab_size=300, max_bytes=100_000)
    assert not info.reused and info.vocab_size == 300 and info.source.startswith("stdlib:")
    assert {p.name for p in out.iterdir()} >= {"tokenizer.json", "train.bin", "val.bin", "meta.json"}
    train = info.train_dataset()
    assert len(train) == info.train_tokens > 10_000 and len(info.val_dataset()) == info.val_tokens > 100
    assert info.unigram_entropy == pytest.approx(unigram_entropy(train.tokens_N, 300))
    assert 0 < info.unigram_entropy < math.log(300)
    assert load_tokenizer(out).to_str() == load_tokenizer(info.tokenizer_path).to_str()
    mtime = info.train_path.stat().st_mtime_ns

    again = prepare_data(out, vocab_size=300, max_bytes=100_000)
    assert again.reused and info.train_path.stat().st_mtime_ns == mtime
    assert {**vars(again), "reused": False} == vars(info)

    other = prepare_data(out, vocab_size=320, max_bytes=100_000)
    assert not other.reused and other.vocab_size == 320
    assert not prepare_data(out, vocab_size=320, max_bytes=100_000, force=True).reused


def test_prepare_data_from_text_file(tmp_path: Path) -> None:
    src = tmp_path / "tiny.txt"
    src.write_text("".join(f"to be or not to be, line {i}\n" for i in range(2000)))
    info = prepare_data(tmp_path / "run", data=src, vocab_size=300)
    assert info.source == str(src.resolve()) and info.train_docs >= 1 and info.val_docs >= 1
    tok = load_tokenizer(info.tokenizer_path)
    val_text = decode(tok, info.val_dataset().tokens_N.tolist())
    assert EOT not in val_text and val_text.startswith("to be or not to be, line 1900\n")


# ---------------------------------------------------------------- kinds of Python source

KINDS_SRC = '''"""Module doc."""
import os  # note

def f(x):
    \'\'\'Doc.\'\'\'
    return "s" + x
'''


def test_python_char_kinds() -> None:
    kinds = python_char_kinds(KINDS_SRC)
    assert len(kinds) == len(KINDS_SRC)

    def kind_of(fragment: str) -> set[str]:
        i = KINDS_SRC.index(fragment)
        return set(kinds[i : i + len(fragment)])

    assert kind_of('"""Module doc."""') == {"comment/docstring"}
    assert kind_of("# note") == {"comment/docstring"}
    assert kind_of("\'\'\'Doc.\'\'\'") == {"comment/docstring"}
    assert kind_of('"s"') == {"string"}
    assert kind_of("import") == kind_of("return") == kind_of("f(x):") == {"code"}
    assert kind_of("\n\n") == kind_of("    ") == {"whitespace"}
    # a snippet that does not tokenize still gets a kind per character
    assert python_char_kinds("x = 'unterminated")[:3] == ["code", "whitespace", "code"]


def test_token_kinds() -> None:
    tok = small_tokenizer()
    kinds = token_kinds(tok, KINDS_SRC)
    ids = encode(tok, KINDS_SRC)
    assert len(kinds) == len(ids) and set(kinds) == {"code", "comment/docstring", "string", "whitespace"}
    assert kinds[0] == "comment/docstring" and decode(tok, ids[:1]) in '"""Module doc."""'


def test_stdlib_corpus_leaves_out_generated_codec_tables():
    """encodings/cp1252.py and friends are gencodec output: out; hand-written codecs (idna.py) stay."""
    from moekit.data.corpus import is_generated_codec, stdlib_corpus

    corpus = stdlib_corpus(val_fraction=0.05)
    names = {Path(str(d.path)).as_posix().split("/encodings/")[-1] for d in corpus.train + corpus.val
             if "/encodings/" in Path(str(d.path)).as_posix()}
    assert "cp1252.py" not in names and "mac_roman.py" not in names
    assert "idna.py" in names and "__init__.py" in names
    import encodings.cp1252
    import encodings.idna

    assert is_generated_codec(Path(encodings.cp1252.__file__))
    assert not is_generated_codec(Path(encodings.idna.__file__))
