"""A prefill chunk riding a decode step: one forward of (B + 1, n) rows, decode rows left-padded to n.

Each row computes what it computes alone (to rounding), the holes the padding leaves in the decode rows'
caches are dropped when the batch is split, padding is not counted as routed tokens, and the engine runs
such steps (``mixed_prefill``, ``moekit serve --mixed-prefill``) as one forward whose requests still get
`generate`'s tokens."""
from __future__ import annotations

import threading

import torch

from moekit.infer import generate
from moekit.nn.attention import KVCache
from moekit.serve.engine import Engine, SamplingParams
from moekit.serve.kvbatch import split_batch, stack_caches
from moekit.serve.router_tap import RouterTap

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _filled(model, ids: list[int]) -> KVCache:
    c = KVCache(model.config.n_layers)
    model(torch.tensor([ids]), kv_cache=c)
    return c


def _copy(c: KVCache) -> KVCache:
    out = KVCache(len(c.k))
    out.k, out.v, out.mask = list(c.k), list(c.v), c.mask
    return out


def test_a_riding_chunk_and_the_padded_decode_rows_compute_what_they_compute_alone(model_tok):
    model, _ = model_tok
    a_prompt, a_next = [5, 9, 11, 3, 8, 2, 6], 4
    b_prefix, b_chunk = [12, 13, 14], [15, 16, 17, 18]
    tap = RouterTap(model, model.config.moe.num_experts)
    tap.attach()
    try:
        with torch.no_grad():
            a, b = _filled(model, a_prompt), _filled(model, b_prefix)
            tap.take()
            a_alone, b_alone = _copy(a), _copy(b)
            want_a = model(torch.tensor([[a_next]]), kv_cache=a_alone).logits[0, -1]
            counts = tap.take()
            want_b = model(torch.tensor([b_chunk]), kv_cache=b_alone).logits[0, -1]
            counts = counts + tap.take()
            batch, pads = stack_caches([a, b])
            ids = torch.tensor([[0, 0, 0, a_next], b_chunk])
            mask = torch.tensor([[0, 0, 0, 1], [1, 1, 1, 1]])
            got = model(ids, attention_mask=mask, kv_cache=batch).logits[:, -1]
            padded_counts = tap.take(mask.reshape(-1).bool())
    finally:
        tap.remove()
    torch.testing.assert_close(got[0], want_a, **TOL)
    torch.testing.assert_close(got[1], want_b, **TOL)
    assert (padded_counts == counts).all() and padded_counts.sum() == 5 * model.config.moe.top_k * len(tap.layers)
    # the split drops the holes: each row's cache is the one it built alone
    assert batch.length == len(b_prefix) + 4 + (len(a_prompt) - len(b_prefix)) and int(batch.mask[0].sum()) == 8
    for own, alone in zip(split_batch(batch, pads), (a_alone, b_alone)):
        assert own.mask is None and own.length == alone.length
        for layer in range(model.config.n_layers):
            torch.testing.assert_close(own.k[layer], alone.k[layer], **TOL)
            torch.testing.assert_close(own.v[layer], alone.v[layer], **TOL)


class _Shapes(torch.nn.Module):
    """The model, recording the (B, S) of every forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.shapes = inner, inner.config, []

    def new_kv_cache(self):
        return self.inner.new_kv_cache()

    def forward(self, input_ids, **kw):
        self.shapes.append(tuple(input_ids.shape))
        return self.inner(input_ids, **kw)


def test_the_engine_prefills_a_late_request_inside_the_decode_steps(model_tok):
    model, tok = model_tok
    wrapped = _Shapes(model)
    eng = Engine(wrapped, tok, max_batch=2, prefill_chunk=4, mixed_prefill=True).start()
    early_ids, late_ids = [1, 2, 3], list(range(10, 29))  # 19 prompt tokens: chunks of 4, 4, 4, 4, 3
    out = {"early": [], "late": []}
    done = {k: threading.Event() for k in out}
    started = threading.Event()

    def sink_for(name):
        def sink(ev):
            if ev.kind == "token":
                out[name].append(ev.token_id)
                started.set()
            else:
                done[name].set()
        return sink

    try:
        eng.submit(early_ids, SamplingParams(60, temperature=0, ignore_eos=True), sink_for("early"))
        assert started.wait(30)
        eng.submit(late_ids, SamplingParams(8, temperature=0, ignore_eos=True), sink_for("late"))
        assert done["late"].wait(30) and done["early"].wait(30)
    finally:
        eng.shutdown()
    assert (2, 4) in wrapped.shapes and (2, 3) in wrapped.shapes  # the chunks rode decode steps
    assert (1, 4) not in wrapped.shapes  # and never ran as forwards of their own
    with torch.no_grad():
        for name, ids, n in (("early", early_ids, 60), ("late", late_ids, 8)):
            want = generate(model, torch.tensor([ids]), n, temperature=0)[0, len(ids):].tolist()
            assert out[name] == want, name


def test_without_mixed_prefill_a_chunk_runs_alone(model_tok):
    model, tok = model_tok
    wrapped = _Shapes(model)
    eng = Engine(wrapped, tok, max_batch=2, prefill_chunk=4).start()
    started, done = threading.Event(), threading.Event()
    try:
        eng.submit([1, 2, 3], SamplingParams(40, temperature=0, ignore_eos=True),
                   lambda ev: started.set() if ev.kind == "token" else None)
        assert started.wait(30)
        eng.submit(list(range(10, 22)), SamplingParams(2, temperature=0, ignore_eos=True),
                   lambda ev: done.set() if ev.kind != "token" else None)
        assert done.wait(30)
    finally:
        eng.shutdown()
    assert (1, 4) in wrapped.shapes and not any(b == 2 and s > 1 for b, s in wrapped.shapes)
