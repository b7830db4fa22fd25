"""The engine's parts without HTTP: stacked KV caches, stop strings, chat templates, sampling params."""
from __future__ import annotations

import pytest
import torch

from moekit.nn.attention import KVCache
from moekit.serve.engine import SamplingParams
from moekit.serve.kvbatch import split_batch, stack_caches
from moekit.serve.text import ChatTemplate, StopText, TemplateError


def _cache(L: int, seed: int) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    c = KVCache(2)
    c.k = [torch.randn(1, 2, L, 4, generator=g) for _ in range(2)]
    c.v = [torch.randn(1, 2, L, 4, generator=g) for _ in range(2)]
    return c


def test_stack_then_split_gives_each_cache_back():
    caches = [_cache(5, 0), _cache(3, 1), _cache(7, 2)]
    batch, pads = stack_caches(caches)
    assert pads == [2, 4, 0] and batch.k[0].shape == (3, 2, 7, 4)
    assert batch.mask.tolist()[1] == [False] * 4 + [True] * 3
    for c, back in zip(caches, split_batch(batch, pads)):
        for layer in range(2):
            assert torch.equal(back.k[layer], c.k[layer]) and torch.equal(back.v[layer], c.v[layer])
        assert back.mask is None


def test_one_cache_or_equal_lengths_need_no_mask():
    one = _cache(4, 0)
    batch, pads = stack_caches([one])
    assert batch is one and pads == [0]
    batch, _ = stack_caches([_cache(4, 0), _cache(4, 1)])
    assert batch.mask is None


def test_stacked_decode_equals_decoding_alone(model_tok):
    """A left-padded row of a stacked batch computes the logits it computes alone (to rounding)."""
    model, _ = model_tok
    prompts = [[5, 9, 11, 3, 8], [4, 2], [12, 13, 14]]
    alone, caches = [], []
    for p in prompts:
        c = KVCache(model.config.n_layers)
        with torch.no_grad():
            model(torch.tensor([p]), kv_cache=c)
            alone.append(model(torch.tensor([[1]]), kv_cache=_copy(c)).logits[0, -1])
        caches.append(c)
    batch, _ = stack_caches(caches)
    with torch.no_grad():
        logits = model(torch.tensor([[1]] * 3), kv_cache=batch).logits[:, -1]
    for i in range(3):
        torch.testing.assert_close(logits[i], alone[i], rtol=1e-5, atol=1e-5)


def _copy(c: KVCache) -> KVCache:
    out = KVCache(len(c.k))
    out.k, out.v, out.mask = list(c.k), list(c.v), c.mask
    return out


class _CharTok:
    """decode(ids) = the characters chr(id); id 0 stands for half a character (an incomplete UTF-8 tail)."""

    @staticmethod
    def decode(ids):
        return "".join("\ufffd" if i == 0 else chr(i) for i in ids)


def test_stop_text_never_streams_a_stop_string():
    st = StopText(_CharTok.decode, ["END"])
    out = []
    for ch in "abcENxyzEN":
        out.append(st.push(ord(ch)))
    assert "".join(d for d, _ in out) == "abcENxyz" and not any(s for _, s in out)  # "EN" held back at the end
    delta, stopped = st.push(ord("D"))
    assert stopped and delta == "" and st.text == "abcENxyz"


def test_stop_text_holds_back_an_incomplete_character_and_flushes():
    st = StopText(_CharTok.decode)
    assert st.push(ord("a")) == ("a", False)
    assert st.push(0) == ("", False)
    assert st.flush() == "\ufffd"


def test_chat_template_renders_and_refuses(tmp_path):
    t = ChatTemplate("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}[assistant]{% endif %}{{ eos_token }}", {"eos_token": "</s>"})
    assert t.render([{"role": "user", "content": "hi"}]) == "[user] hi\n[assistant]</s>"
    strict = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}")
    with pytest.raises(TemplateError, match="user first"):
        strict.render([{"role": "system", "content": "x"}])
    with pytest.raises(TemplateError, match="no chat template"):
        ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "hi"}])
    (tmp_path / "tokenizer_config.json").write_text(
        '{"chat_template": [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]}')
    assert ChatTemplate.from_dir(tmp_path).render([]) == "D"


@pytest.mark.parametrize("kw,match", [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 1, "temperature": -1},
                                      "temperature"), ({"max_tokens": 1, "top_p": 0}, "top_p"),
                                      ({"max_tokens": 1, "top_k": 0}, "top_k")])
def test_sampling_params_name_the_bad_field(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_router_tap_counts_equal_moe_stats(model_tok):
    """The hook's bincount of the router's picks is MoEStats.tokens_per_expert, prefill and batched decode."""
    from moekit.serve.router_tap import RouterTap

    model, _ = model_tok
    tap = RouterTap(model, model.config.moe.num_experts)
    try:
        tap.attach()
        assert tap.layers == [i for i in range(model.config.n_layers) if model.config.is_moe_layer(i)]
        cache = KVCache(model.config.n_layers)
        with torch.no_grad():
            for ids in (torch.tensor([[5, 9, 11, 3, 8, 2, 4]]), torch.tensor([[1]])):
                out = model(ids, kv_cache=cache)
                want = torch.stack([out.stats[i].tokens_per_expert for i in tap.layers]).numpy()
                got = tap.take()
                assert got.tolist() == want.tolist() and got.sum() == ids.numel() * model.config.moe.top_k * len(
                    tap.layers)
        assert tap.take() is None  # nothing new since
    finally:
        tap.remove()
    with torch.no_grad():
        model(torch.tensor([[1, 2]]))
    assert tap.take() is None  # removed hooks record nothing


def test_a_chunked_prefill_gives_the_logits_of_one_forward(model_tok):
    model, _ = model_tok
    ids = torch.tensor([[5, 9, 11, 3, 8, 2, 4, 6, 10, 12, 13]])
    with torch.no_grad():
        whole = model(ids, kv_cache=KVCache(model.config.n_layers)).logits[0, -1]
        cache = KVCache(model.config.n_layers)
        for a in range(0, ids.shape[1], 4):
            last = model(ids[:, a:a + 4], kv_cache=cache).logits[0, -1]
    torch.testing.assert_close(last, whole, rtol=1e-5, atol=1e-5)


def test_engine_chunks_a_prompt_that_arrives_while_another_decodes(model_tok):
    """Its prompt goes in prefill_chunk pieces between decode steps; both requests get their tokens."""
    import threading
    import time

    from moekit.serve.engine import Engine

    model, tok = model_tok
    eng = Engine(model, tok, max_batch=2, prefill_chunk=4).start()
    try:
        done, firsts = threading.Event(), {}

        def sink_for(name):
            def sink(ev):
                if ev.kind == "token" and name not in firsts:
                    firsts[name] = eng.steps
                if ev.kind == "finish" and name == "late":
                    done.set()
            return sink

        eng.submit([1, 2, 3], SamplingParams(200, temperature=0), sink_for("early"))
        while "early" not in firsts:
            time.sleep(0.001)
        steps0 = eng.steps
        eng.submit(list(range(10, 30)), SamplingParams(3, temperature=0), sink_for("late"))
        assert done.wait(30)
        assert firsts["late"] - steps0 >= 20 // 4 - 1  # five chunks of 4, one per step
    finally:
        eng.shutdown()
