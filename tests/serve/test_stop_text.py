"""Incremental detokenization: the streamed text equals decoding every id at once, on real tokenizers
(a byte-level BPE that splits characters across tokens, and a SentencePiece-style Metaspace decoder that
drops the first token's leading space), whatever the ids, with and without stop strings."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moekit.data import decode, train_tokenizer
from moekit.serve.text import StopText

_TEXT = ["naïve café — déjà vu, 東京 and 🤖🎉 emoji; def f(x):\n    return x ** 2  # ok ✓",
         "Größe, Ærø, 北京市, 😀 smile, ∑ σ² → ∞, the end."] * 20


@pytest.fixture(scope="module")
def byte_bpe():
    return train_tokenizer(_TEXT, 300, min_frequency=1)


@pytest.fixture(scope="module")
def metaspace():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(_TEXT, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"], show_progress=False))
    return tok


def _stream(tok, ids, stop=()):
    st_ = StopText(lambda x: decode(tok, x), stop)
    out, stopped = [], False
    for i in ids:
        delta, stopped = st_.push(i)
        full = decode(tok, st_.ids)
        out.append(delta)
        assert full.startswith("".join(out)) or stopped, "streamed text must be a prefix of the full decode"
        if stopped:
            break
    if not stopped:
        out.append(st_.flush())
    return "".join(out), stopped, st_


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_incremental_equals_full_decode_for_any_ids(byte_bpe, metaspace, data):
    for tok in (byte_bpe, metaspace):
        ids = data.draw(st.lists(st.integers(0, tok.get_vocab_size() - 1), max_size=40))
        text, stopped, _ = _stream(tok, ids)
        assert not stopped and text == decode(tok, ids)


@pytest.mark.parametrize("which", ["byte_bpe", "metaspace"])
def test_real_text_streams_back_exactly_and_stops_before_the_stop_string(which, request):
    tok = request.getfixturevalue(which)
    text = _TEXT[0] + _TEXT[1]
    ids = tok.encode(text).ids
    full = decode(tok, ids)
    assert _stream(tok, ids)[0] == full
    streamed, stopped, st_ = _stream(tok, ids, stop=["σ²"])
    assert stopped and streamed == full[: full.index("σ²")] == st_.text


def test_a_long_stream_decodes_a_window_not_everything(byte_bpe):
    """Each push decodes the ids since the last complete character: the work per token stays flat."""
    seen: list[int] = []

    def counting(ids):
        seen.append(len(ids))
        return decode(byte_bpe, ids)

    ids = byte_bpe.encode(" ".join(_TEXT)).ids
    st_ = StopText(counting)
    for i in ids:
        st_.push(i)
    assert len(ids) > 500 and max(seen) <= 8
    assert st_.flush() == "" and st_.emitted == decode(byte_bpe, ids)
