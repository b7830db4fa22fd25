"""KV cache: incremental decoding equals full recomputation (also with left padding), and `generate`.

Legend: B batch, S sequence, V vocabulary.
"""
from __future__ import annotations

import pytest
import torch

from moekit.infer import generate
from moekit.nn.transformer import KVCache

TOL = {"rtol": 1e-4, "atol": 1e-5}
CASES = {
    "topk": {"router": "topk"},
    "switch": {"router": "switch"},
    "noisy_topk": {"router": "noisy_topk"},
    "sigmoid_bias": {"router": "sigmoid_bias"},
    "dense_model": {"router": "topk", "dense": True},
    "gqa_qk_norm_untied_moe_every_2": {"router": "topk", "n_heads": 4, "n_kv_heads": 1, "qk_norm": True,
                                           "tie_embeddings": False, "moe_every": 2},
}


def _model(case, tiny_model):
    kw = dict(CASES[case])
    model = tiny_model(kw.pop("router"), **kw)
    for layer in model.moe_layers():  # a non-zero bias, so the cached path must route with it too
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    return model


def _left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    S = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), S, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, S - len(r):] = r
        mask[i, S - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("case", list(CASES))
def test_cached_decoding_equals_full_recomputation(case, tiny_model, tokens):
    model = _model(case, tiny_model)
    x_BS = tokens(2, 14)
    full = model(x_BS).logits
    cache = KVCache(model.config.n_layers)
    # prefill 5, then chunks of 1, 3 (several new tokens on top of a cache) and 1 at a time
    pieces, start = [], 0
    for n in (5, 1, 3, 1, 1, 1, 1, 1):
        out = model(x_BS[:, start:start + n], kv_cache=cache)
        assert out.kv_cache is cache and cache.length == start + n
        pieces.append(out.logits)
        start += n
    assert start == 14
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_left_padded_batch_equals_each_sequence_alone(case, tiny_model, tokens):
    """RoPE positions count real tokens only and padded keys are masked: a left-padded row gives the
    logits of the same sequence run alone, in full and through the cache."""
    model = _model(case, tiny_model)
    rows = [tokens(1, 5, seed=1)[0], tokens(1, 9, seed=2)[0], tokens(1, 7, seed=3)[0]]
    prompt_BS, mask_BS = _left_pad(rows)
    cont_BS = tokens(3, 4, seed=4)  # the same 4 continuation tokens appended to each row
    ids_BS = torch.cat([prompt_BS, cont_BS], dim=1)
    mask_full = torch.cat([mask_BS, torch.ones(3, 4, dtype=torch.long)], dim=1)
    full = model(ids_BS, attention_mask=mask_full).logits
    cache = KVCache(model.config.n_layers)
    cached = [model(prompt_BS, attention_mask=mask_BS, kv_cache=cache).logits]
    cached += [model(cont_BS[:, i:i + 1], kv_cache=cache).logits for i in range(4)]
    cached = torch.cat(cached, dim=1)
    for i, r in enumerate(rows):
        alone = model(torch.cat([r, cont_BS[i]]).unsqueeze(0)).logits[0]
        n = len(r) + 4
        torch.testing.assert_close(full[i, -n:], alone, **TOL)
        torch.testing.assert_close(cached[i, -n:], alone, **TOL)


def _greedy_loop_without_cache(model, ids_BS, mask_BS, n):
    """The plainest reference: recompute everything, take the argmax of the last position."""
    for _ in range(n):
        logits = model(ids_BS, attention_mask=mask_BS).logits[:, -1]
        ids_BS = torch.cat([ids_BS, logits.argmax(-1, keepdim=True)], dim=1)
        if mask_BS is not None:
            mask_BS = torch.cat([mask_BS, torch.ones_like(mask_BS[:, :1])], dim=1)
    return ids_BS


@pytest.mark.parametrize("case", list(CASES))
def test_generate_greedy_with_cache_equals_no_cache_loop(case, tiny_model, tokens):
    model = _model(case, tiny_model)
    rows = [tokens(1, 3, seed=5)[0], tokens(1, 8, seed=6)[0]]
    prompt_BS, mask_BS = _left_pad(rows)
    cached = generate(model, prompt_BS, 12, temperature=0, attention_mask=mask_BS)
    assert cached.shape == (2, 8 + 12)
    reference = _greedy_loop_without_cache(model, prompt_BS, mask_BS, 12)
    torch.testing.assert_close(cached, reference, rtol=0, atol=0)
    torch.testing.assert_close(cached, generate(model, prompt_BS, 12, temperature=0, attention_mask=mask_BS,
                                                use_cache=False), rtol=0, atol=0)
    for i, r in enumerate(rows):  # batching with left padding does not change a row's continuation
        alone = generate(model, r.unsqueeze(0), 12, temperature=0)
        assert cached[i, -12:].tolist() == alone[0, -12:].tolist()


def test_generate_greedy_is_deterministic_and_sampling_follows_the_generator(tiny_model, tokens):
    model = tiny_model("noisy_topk")
    prompt = tokens(2, 4)
    greedy = generate(model, prompt, 10, temperature=0)
    assert torch.equal(greedy, generate(model, prompt, 10, temperature=0))
    assert torch.equal(greedy[:, :4], prompt)

    def sample(seed, **kw):
        gen = torch.Generator().manual_seed(seed)
        return generate(model, prompt, 10, temperature=1.0, generator=gen, **kw)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    assert torch.equal(sample(0), sample(0, use_cache=False))
    assert torch.equal(sample(0, top_k=1), greedy)  # a support of one token is greedy
    assert torch.equal(sample(3, top_p=1e-6), greedy)


def test_generate_leaves_the_model_in_its_mode(tiny_model, tokens):
    model = tiny_model("noisy_topk").train()
    out = generate(model, tokens(1, 3), 5, temperature=0)
    assert model.training
    model.eval()  # generation ran without router noise: same as in eval mode
    assert torch.equal(out, generate(model, tokens(1, 3), 5, temperature=0))


def test_generate_stops_at_eos(tiny_model, tokens):
    model = tiny_model()
    prompt = tokens(2, 4)
    greedy = generate(model, prompt, 8, temperature=0)
    eos = int(greedy[0, 6])  # row 0's third new token
    out = generate(model, prompt, 8, temperature=0, eos_id=eos)
    first = [int(torch.nonzero(row[4:] == eos)[0]) if (row[4:] == eos).any() else None for row in out]
    for i, f in enumerate(first):
        if f is None:  # a row that never produced eos ran the full length, unchanged
            assert out.shape[1] == 12 and torch.equal(out[i], greedy[i])
        else:  # up to eos it is the greedy text; after it, only eos
            assert torch.equal(out[i, :4 + f + 1], greedy[i, :4 + f + 1])
            assert (out[i, 4 + f:] == eos).all()
    single = generate(model, prompt[:1], 8, temperature=0, eos_id=eos)
    assert single.shape[1] <= 4 + 3 and int(single[0, -1]) == eos  # all rows done: decoding stopped early


def test_generate_rejects_bad_arguments(tiny_model, tokens):
    model = tiny_model()
    prompt = tokens(2, 4)
    right_padded = torch.ones(2, 4, dtype=torch.long)
    right_padded[0, -1] = 0
    with pytest.raises(ValueError, match="left padding"):
        generate(model, prompt, 3, attention_mask=right_padded)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate(model, prompt, 61)
    with pytest.raises(ValueError, match="temperature=-1"):
        generate(model, prompt, 3, temperature=-1)
    with pytest.raises(ValueError, match="top_p=0"):
        generate(model, prompt, 3, top_p=0)
    with pytest.raises(ValueError, match="top_k=0"):
        generate(model, prompt, 3, top_k=0)
    assert torch.equal(generate(model, prompt, 0), prompt)


def test_cache_appends_in_place_and_never_writes_over_a_view_it_handed_out():
    """Decoding appends into spare room (the buffer is reallocated only when full: doubling), with or
    without max_len; keys handed out earlier, or put back by a caller (a rollback), stay as they were."""
    for max_len in (None, 64):
        cache = KVCache(1, max_len=max_len)
        k0 = torch.randn(1, 2, 5, 4)
        cache.update(0, k0, k0 + 1)
        buffers = set()
        seen = []
        for step in range(20):
            k = torch.full((1, 2, 1, 4), float(step))
            keys, values = cache.update(0, k, k + 1)
            buffers.add(keys.untyped_storage().data_ptr())
            seen.append(keys)
            assert torch.equal(keys[:, :, :5], k0) and torch.equal(keys[:, :, -1:], k)
            assert torch.equal(values, keys + 1)
        assert len(buffers) <= 3  # 5 -> 16 -> 32 slots, not one buffer per token
        assert cache.length == 25
        early = seen[3].clone()
        saved = cache.k[0], cache.v[0]
        cache.update(0, torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
        assert torch.equal(seen[3], early)
        cache.k[0], cache.v[0] = saved  # a failed step rolled back by its caller
        keys, _ = cache.update(0, torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))
        assert cache.length == 26 and torch.equal(keys[:, :, -1:], torch.ones(1, 2, 1, 4))
        assert torch.equal(keys[:, :, :25], saved[0])


def test_logits_to_keep_projects_only_the_last_positions(tiny_model, tokens):
    model = tiny_model("topk").eval()
    ids = tokens(2, 12)
    with torch.no_grad():
        full = model(ids).logits
        last2 = model(ids, logits_to_keep=2).logits
    assert last2.shape == (2, 2, full.shape[-1])
    torch.testing.assert_close(last2, full[:, -2:], **TOL)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=1)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, logits_to_keep=-1)


def test_a_padded_chunk_after_an_unpadded_cache(tiny_model, tokens):
    """A cache filled without a mask, then a chunk with padding in it (a decode row padded to the width of
    another row's prompt chunk): the cached keys count as real, the padded ones are skipped, so the last
    position equals a plain decode of the same real tokens."""
    model = tiny_model("topk").eval()
    seq = tokens(1, 9)
    prompt, nxt = seq[:, :8], seq[:, 8:9]
    with torch.no_grad():
        plain = model.new_kv_cache()
        model(prompt, kv_cache=plain)
        want = model(nxt, kv_cache=plain).logits[:, -1]
        padded = model.new_kv_cache()
        model(prompt, kv_cache=padded)
        chunk = torch.cat([torch.zeros(1, 3, dtype=torch.long), nxt], dim=1)
        mask = torch.tensor([[0, 0, 0, 1]])
        got = model(chunk, attention_mask=mask, kv_cache=padded).logits[:, -1]
    assert padded.mask is not None and padded.mask.shape == (1, 12) and int(padded.mask.sum()) == 9
    torch.testing.assert_close(got, want, **TOL)
