"""`moekit serve --compile`: the running batch decodes in the compiled rows step (alone or together), each
request alone with --deterministic; outputs, expert counts and the eager retry of a failed step against
the eager engine and ``generate``."""
from __future__ import annotations

import threading
import time

import torch

from moekit.infer import generate
from moekit.serve.engine import Engine, SamplingParams

PROMPTS = ([5, 9, 11, 3, 8], [1, 2, 3], list(range(10, 24)))
# every compiled-rows engine here has the same rows and chunk, so the buffers have the same shapes and the
# engines after the first reuse its graphs (compiling them is most of this file's time)
ROWS = {"max_batch": 4, "compile": True, "prefill_chunk": 4}


def _run(eng: Engine, prompts, n_tokens: int, together: bool) -> list[list[int]]:
    """Greedy outputs of ``prompts``: one after another, or submitted at once (batched while they overlap)."""
    outs: list[list[int]] = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def sink_for(i):
        def sink(ev):
            if ev.kind == "token":
                outs[i].append(ev.token_id)
            elif ev.kind in ("finish", "error"):
                assert ev.kind == "finish", ev
                done[i].set()
        return sink

    for i, p in enumerate(prompts):
        eng.submit(p, SamplingParams(n_tokens, temperature=0, ignore_eos=True), sink_for(i))
        if not together:
            assert done[i].wait(60)
    assert all(d.wait(60) for d in done)
    return outs


def test_alone_requests_equal_generate_and_count_their_experts(model_tok):
    model, tok = model_tok
    eng = Engine(model, tok, **ROWS).start()
    try:
        assert eng.compile_s > 0
        outs = _run(eng, PROMPTS, 12, together=False)
        counted = int(eng.experts.total_LE.sum())
        # the warm-up (one step per bucket: 1, 2, 4 rows), then every decode step
        assert eng._rows.rows.steps == 3 + 11 * len(PROMPTS)
    finally:
        eng.shutdown()
    for p, out in zip(PROMPTS, outs):
        want = generate(model, torch.tensor([p]), 12, temperature=0)[0, len(p):].tolist()
        assert out == want
    # the prompt in the prefill, then 11 compiled steps (the 12th token is sampled, never fed), k experts
    # per token in every MoE layer: the counts the compiled step returned reached the metrics
    fed = sum(len(p) + 11 for p in PROMPTS)
    assert counted == fed * model.config.moe.top_k * len(eng.experts.layers)


def test_deterministic_concurrent_requests_equal_generate(model_tok):
    """--deterministic steps every request alone: all three overlap, each in its own static cache."""
    model, tok = model_tok
    eng = Engine(model, tok, max_batch=4, deterministic=True, compile=True).start()
    try:
        outs = _run(eng, PROMPTS, 16, together=True)
    finally:
        eng.shutdown()
    for p, out in zip(PROMPTS, outs):
        assert out == generate(model, torch.tensor([p]), 16, temperature=0)[0, len(p):].tolist()


def test_batched_requests_in_compiled_rows_agree_with_the_eager_engine(model_tok):
    """Requests that overlap share the compiled step (rows join and leave as they start and finish): every
    one completes with all its tokens, agrees with the eager engine on the same workload, and the expert
    counts are those of the real rows only (padding rows of a bucket are not counted)."""
    model, tok = model_tok
    eager = Engine(model, tok, max_batch=4).start()
    try:
        want = _run(eager, PROMPTS, 16, together=True)
    finally:
        eager.shutdown()
    eng = Engine(model, tok, **ROWS).start()
    try:
        got = _run(eng, PROMPTS, 16, together=True)
        counted = int(eng.experts.total_LE.sum())
    finally:
        eng.shutdown()
    assert [len(o) for o in got] == [16] * len(PROMPTS)
    same = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w))
    assert same >= 0.9 * 16 * len(PROMPTS)  # batched rows round differently from a row alone
    fed = sum(len(p) + 15 for p in PROMPTS)
    assert counted == fed * model.config.moe.top_k * len(eng.experts.layers)


def test_a_failed_compiled_step_is_retried_eagerly(model_tok, monkeypatch):
    """A compiled step that raises gives every row its cache back (copies) and the step runs eagerly row by
    row: no request fails, and the greedy outputs are still generate()'s; the rows serve the next steps."""
    model, tok = model_tok
    eng = Engine(model, tok, **ROWS)
    real_step, calls = eng._rows.rows.step, []

    def flaky(ids_n1):
        calls.append(ids_n1.shape[0])
        if len(calls) in (3, 4):
            raise RuntimeError("injected")
        return real_step(ids_n1)

    monkeypatch.setattr(eng._rows.rows, "step", flaky)
    eng.start()
    try:
        outs = _run(eng, PROMPTS[:2], 10, together=True)
    finally:
        eng.shutdown()
    assert len(calls) > 6  # the rows took the steps after the failures again
    for p, out in zip(PROMPTS[:2], outs):
        want = generate(model, torch.tensor([p]), 10, temperature=0)[0, len(p):].tolist()
        assert sum(a == b for a, b in zip(out, want)) >= 9  # batched rows may round a near tie differently


def test_prompts_arriving_mid_decode_prefill_through_the_compiled_chunk(model_tok):
    """Requests that arrive while another decodes are prefilled a chunk per step in the staging row (a
    14-token prompt in chunks of 4), then join the compiled batch: every output is generate()'s to rounding,
    and the counts are those of the real tokens (a chunk's padding is not counted)."""
    model, tok = model_tok
    eng = Engine(model, tok, **ROWS)
    staged, real_stage = [], eng._rows.rows.stage

    def counting_stage(ids):
        staged.append(ids.numel())
        return real_stage(ids)

    eng._rows.rows.stage = counting_stage
    first, outs, done = threading.Event(), {}, []
    lock = threading.Lock()

    def sink_for(name):
        outs[name] = []

        def sink(ev):
            if ev.kind == "token":
                outs[name].append(ev.token_id)
                if name == "long" and len(outs[name]) == 2:
                    first.set()
            elif ev.kind in ("finish", "error"):
                assert ev.kind == "finish", ev
                with lock:
                    done.append(name)
        return sink

    eng.start()
    try:
        eng.submit(PROMPTS[0], SamplingParams(60, temperature=0, ignore_eos=True), sink_for("long"))
        assert first.wait(60)
        for name, p in (("b", PROMPTS[2]), ("c", PROMPTS[1])):
            eng.submit(p, SamplingParams(12, temperature=0, ignore_eos=True), sink_for(name))
        deadline = time.monotonic() + 120
        while len(done) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        counted = int(eng.experts.total_LE.sum())
    finally:
        eng.shutdown()
    assert sorted(done) == ["b", "c", "long"]
    assert staged and max(staged) <= 4 and sum(staged) >= len(PROMPTS[2])  # b (at least) went through chunks
    for name, p, n in (("long", PROMPTS[0], 60), ("b", PROMPTS[2], 12), ("c", PROMPTS[1], 12)):
        want = generate(model, torch.tensor([p]), n, temperature=0)[0, len(p):].tolist()
        assert sum(a == b for a, b in zip(outs[name], want)) >= 0.9 * n, name
    fed = len(PROMPTS[0]) + 59 + len(PROMPTS[2]) + 11 + len(PROMPTS[1]) + 11
    assert counted == fed * model.config.moe.top_k * len(eng.experts.layers)


def test_one_row_compiles_no_prompt_chunk(model_tok, monkeypatch):
    """With one row no prompt is admitted while another decodes, so the rows get no chunk graph to compile;
    with more rows they get the engine's chunk."""
    import moekit.serve.engine as engine_mod

    model, tok = model_tok
    made = []

    class Recorded:
        compile_s = 0.0

        def __init__(self, model, max_batch, chunk=0):
            made.append((max_batch, chunk))

    monkeypatch.setattr(engine_mod, "CompiledRows", Recorded)
    for rows in (1, 3):
        Engine(model, tok, max_batch=rows, compile=True, prefill_chunk=8)
    assert made == [(1, 0), (3, 8)]
