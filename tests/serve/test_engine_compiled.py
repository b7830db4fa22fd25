"""`moekit serve --compile`: a request decoding alone takes the compiled step, and its output, its expert
counts and the hand-over to and from the batched (eager) path are what the eager engine gives."""
from __future__ import annotations

import threading

import torch

from moekit.infer import generate
from moekit.serve.engine import Engine, SamplingParams

PROMPTS = ([5, 9, 11, 3, 8], [1, 2, 3], list(range(10, 24)))


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
    eng = Engine(model, tok, max_batch=4, compile=True).start()
    try:
        assert eng.compile_s > 0
        outs = _run(eng, PROMPTS, 12, together=False)
        counted = int(eng.experts.total_LE.sum())
        assert eng._compiled.decoder.steps == 1 + 11 * len(PROMPTS)  # the warm-up, then every decode step
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


def test_batching_takes_over_from_the_compiled_step(model_tok):
    """Requests that overlap go from the compiled step (alone) to the eager batch and back: every one
    completes with all its tokens, and agrees with the eager engine on the same workload."""
    model, tok = model_tok
    eager = Engine(model, tok, max_batch=4).start()
    try:
        want = _run(eager, PROMPTS, 16, together=True)
    finally:
        eager.shutdown()
    eng = Engine(model, tok, max_batch=4, compile=True).start()
    try:
        got = _run(eng, PROMPTS, 16, together=True)
    finally:
        eng.shutdown()
    assert [len(o) for o in got] == [16] * len(PROMPTS)
    same = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w))
    assert same >= 0.9 * 16 * len(PROMPTS)  # batched rows round differently from a row alone
