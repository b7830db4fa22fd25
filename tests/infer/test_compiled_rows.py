"""The compiled rows step (:class:`moekit.infer.DecodeRows`) against each sequence decoded eagerly on its own:
rows of different lengths side by side, a bucket's padding rows (not routed, not counted), rows joining
and leaving (the last row moving into a freed one), and what it refuses."""
from __future__ import annotations

import pytest
import torch

from moekit.infer.rows import DecodeRows, row_buckets

from .test_compiled import MODELS, V, _assert_same_choices, _model


def _prefill(model, prompt_1S):
    cache = model.new_kv_cache()
    model(prompt_1S, kv_cache=cache, logits_to_keep=1)
    return cache


def _eager_step(model, cache, token):
    return model(torch.tensor([[token]]), kv_cache=cache).logits[:, -1]


@pytest.mark.parametrize("name", list(MODELS))
def test_rows_equal_each_sequence_alone(one_thread, name):
    """Three prompts (4, 11 and 7 tokens) in a 4-row bucket, teacher-forced past the sliding window: each
    row's logits are its own eager decode's, and each step's counts are the experts the eager layers chose
    for the three real tokens."""
    model = _model(**MODELS[name])
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, V, (1, n), generator=g) for n in (4, 11, 7)]
    feed = torch.randint(0, V, (3, 14), generator=g)
    dec = DecodeRows(model, 4)
    with torch.inference_mode():
        caches = [_prefill(model, p) for p in prompts]
        assert [dec.admit(c) for c in caches] == [0, 1, 2]
        eager, comp = [], []
        for i in range(feed.shape[1]):
            logits, counts = dec.step(feed[:, i:i + 1])
            comp.append(logits)
            with model.record_routing() as rec:
                eager.append(torch.cat([_eager_step(model, c, int(feed[r, i])) for r, c in enumerate(caches)]))
            for layer, calls in rec.items():
                picks = torch.cat([c.reshape(-1) for c in calls])
                assert torch.equal(counts[layer], torch.bincount(picks, minlength=model.config.moe.num_experts))
    _assert_same_choices(torch.stack(eager, 1), torch.stack(comp, 1))
    assert dec.steps == feed.shape[1] and dec.compile_s > 0


def test_rows_join_and_leave(one_thread):
    """Two rows step, a third joins, the first leaves (the last row moves into its place), and a fourth
    joins the freed row: every row keeps decoding exactly what it decodes alone."""
    model = _model(seed=4)
    g = torch.Generator().manual_seed(3)
    dec = DecodeRows(model, 4)  # three rows step in the 4-row bucket, one row of it padding
    seqs = {}  # name -> eager cache; order = the rows

    def step(order, n_steps):
        for _ in range(n_steps):
            tokens = torch.randint(0, V, (len(order), 1), generator=g)
            got, _ = dec.step(tokens)
            want = torch.cat([_eager_step(model, seqs[s], int(t)) for s, t in zip(order, tokens)])
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)

    with torch.inference_mode():
        for name, n in (("a", 5), ("b", 9)):
            seqs[name] = _prefill(model, torch.randint(0, V, (1, n), generator=g))
            dec.admit(seqs[name])
        step(["a", "b"], 4)
        seqs["c"] = _prefill(model, torch.randint(0, V, (1, 3), generator=g))
        assert dec.admit(seqs["c"]) == 2
        step(["a", "b", "c"], 3)
        assert dec.release(0) == 2  # c moves into a's row
        step(["c", "b"], 3)
        seqs["d"] = _prefill(model, torch.randint(0, V, (1, 6), generator=g))
        assert dec.admit(seqs["d"]) == 2
        step(["c", "b", "d"], 2)
        assert dec.release(2) is None  # the last row: nothing moves
        step(["c", "b"], 2)
        own = dec.to_cache(1)  # b's positions as an eager cache
        assert own.length == seqs["b"].length
        torch.testing.assert_close(own.k[0], seqs["b"].k[0])


def test_row_refusals(one_thread):
    model = _model()
    with pytest.raises(ValueError, match="eval mode"):
        DecodeRows(model.train(), 2)
    model.eval()
    with pytest.raises(ValueError, match="rows=0"):
        DecodeRows(model, 0)
    dec = DecodeRows(model, 1)
    with torch.inference_mode():
        two = model.new_kv_cache()
        model(torch.zeros(2, 3, dtype=torch.long), kv_cache=two)
        with pytest.raises(ValueError, match="batch 1"):
            dec.admit(two)
        dec.admit(_prefill(model, torch.zeros(1, 3, dtype=torch.long)))
        with pytest.raises(ValueError, match="all 1 rows are in use"):
            dec.admit(_prefill(model, torch.zeros(1, 2, dtype=torch.long)))
        with pytest.raises(ValueError, match=r"ids must be \(1, 1\)"):
            dec.step(torch.zeros(2, 1, dtype=torch.long))
        dec.slots[0] = model.config.max_seq_len
        with pytest.raises(ValueError, match="context of 96"):
            dec.step(torch.zeros(1, 1, dtype=torch.long))
        staging = DecodeRows(model, 1, chunk=4)
        with pytest.raises(ValueError, match="1 to chunk=4 tokens, got 5"):
            staging.stage(torch.zeros(5, dtype=torch.long))
        staging.staged = model.config.max_seq_len - 2
        with pytest.raises(ValueError, match="passes the model's context of 96"):
            staging.stage(torch.zeros(3, dtype=torch.long))


def test_row_buckets():
    assert row_buckets(1) == [1]
    assert row_buckets(4) == [1, 2, 4]
    assert row_buckets(6) == [1, 2, 4, 6]
    assert row_buckets(8) == [1, 2, 4, 8]
