"""The compiled decode step against the eager one: the same model, the same tokens fed to both (teacher
forcing, so a near tie cannot make the comparison diverge), logits equal to rounding and the same argmax
wherever the eager margin is not a tie; left-padded batches; the per-expert counts it returns; the cases it
refuses; ``generate(compile=...)`` and ``moekit generate --compile``."""
from __future__ import annotations

import pytest
import torch

from moekit.config import MLAConfig, ModelConfig, MoEConfig
from moekit.functional.dispatch import loop_experts_reference
from moekit.infer import CompiledDecoder, generate
from moekit.infer.compiled import MIN_SLOTS, static_length
from moekit.nn.transformer import MoETransformer
from moekit.ops.grouped_ffn import _gathered_forward

V, D = 64, 32


def _model(seed=0, **over) -> MoETransformer:
    torch.manual_seed(seed)
    moe = dict(d_model=D, d_hidden=48, num_experts=4, top_k=2) | over.pop("moe", {})
    cfg = ModelConfig(**(dict(vocab_size=V, d_model=D, n_layers=2, n_heads=4, max_seq_len=96, init_std=0.2,
                             moe=MoEConfig(**moe)) | over))
    return MoETransformer(cfg).eval()


# the default shape, and one that takes most of the other code paths a step meets: GQA, a sliding-window
# layer, per-head q/k norms, shared experts, a dense layer, tied embeddings, a sigmoid router
MODELS = {
    "default": {},
    "gqa_window_shared": dict(n_layers=3, n_kv_heads=2, sliding_window=8, sliding_layers=(1,), qk_norm=True,
                              first_dense_layers=1, tie_embeddings=False,
                              moe=dict(router="sigmoid_bias", num_shared_experts=1)),
    "mla": dict(mla=MLAConfig(kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4,
                              v_head_dim=8)),
}


def _teacher_forced(model, dec, prompt_BS, mask_BS, feed_BN):
    """Eager and compiled logits (B, N, V) for the same fed tokens, and the compiled step's counts."""
    with torch.inference_mode():
        cache = model.new_kv_cache()
        first = model(prompt_BS, attention_mask=mask_BS, kv_cache=cache, logits_to_keep=1).logits[:, -1]
        state = dec.start(cache, mask_BS, prompt_BS.shape[1] + feed_BN.shape[1])
        eager, comp, counts = [], [], []
        for i in range(feed_BN.shape[1]):
            x = feed_BN[:, i:i + 1]
            eager.append(model(x, kv_cache=cache).logits[:, -1])  # the cache extends its key mask
            logits, c = dec.step(x, state)
            comp.append(logits)
            counts.append(c)
    return first, torch.stack(eager, 1), torch.stack(comp, 1), counts


def _assert_same_choices(eager_BNV, comp_BNV):
    torch.testing.assert_close(comp_BNV, eager_BNV, atol=2e-5, rtol=1e-5)
    top2 = eager_BNV.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-4
    assert clear.float().mean() > 0.9  # the model is far from ties: the argmax check below means something
    assert torch.equal(comp_BNV.argmax(-1)[clear], eager_BNV.argmax(-1)[clear])


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_step_equals_eager(one_thread, name):
    model = _model(**MODELS[name])
    dec = CompiledDecoder(model)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, V, (1, 9), generator=g)
    feed = torch.randint(0, V, (1, 20), generator=g)  # past the window: the mask must drop old keys
    _, eager, comp, counts = _teacher_forced(model, dec, prompt, None, feed)
    _assert_same_choices(eager, comp)
    moe_layers = [b.idx for b in model.layers if b.is_moe]
    k = model.config.moe.top_k
    assert all(sorted(c) == moe_layers and all(int(t.sum()) == k for t in c.values()) for c in counts)
    assert dec.compile_s > 0


def test_left_padded_batch_and_routing_counts(one_thread):
    """Two prompts of different lengths, left-padded: each row equals its own eager decode, and the counts
    of each step are the experts the eager layers chose for the real rows."""
    model = _model(seed=3)
    dec = CompiledDecoder(model)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, V, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :4] = 0
    feed = torch.randint(0, V, (2, 12), generator=g)
    _, eager, comp, counts = _teacher_forced(model, dec, prompt, mask, feed)
    _assert_same_choices(eager, comp)
    with torch.inference_mode(), model.record_routing() as rec:  # the same steps again, eagerly, recorded
        _teacher_forced(model, CompiledDecoder(model), prompt, mask, feed[:, :1])
    for layer, calls in rec.items():
        picks = calls[-1]  # the decode step's (B, K) experts
        want = torch.bincount(picks.reshape(-1), minlength=model.config.moe.num_experts)
        assert torch.equal(counts[0][layer], want)


def test_generate_compile_gives_the_eager_tokens(one_thread):
    model = _model(seed=5)
    ids = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(4))
    eager = generate(model, ids, 24, temperature=0)
    dec = CompiledDecoder(model)
    comp = generate(model, ids, 24, temperature=0, compile=dec)
    assert torch.equal(comp, eager)
    before = dec.compile_s
    assert torch.equal(generate(model, ids, 24, temperature=0, compile=dec), eager)
    assert dec.compile_s == before  # the second generation compiled nothing


def test_refusals(one_thread):
    model = _model()
    with pytest.raises(ValueError, match="eval mode"):
        CompiledDecoder(model.train())
    model.eval()
    with pytest.raises(ValueError, match="use_cache"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 2, compile=True, use_cache=False)
    dec = CompiledDecoder(model)
    with torch.inference_mode():
        cache = model.new_kv_cache()
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
        state = dec.start(cache, None, 4)
        state.slot = state.length  # as if the generation had run past what start() was told
        with pytest.raises(ValueError, match="static cache holds"):
            dec.step(torch.zeros(1, 1, dtype=torch.long), state)


def test_static_length_buckets():
    assert static_length(1, 2048) == MIN_SLOTS
    assert static_length(65, 2048) == 128 and static_length(128, 2048) == 128
    assert static_length(1500, 1536) == 1536  # never past the model's limit


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_gathered_experts_equal_the_loop_reference(activation):
    """The traced form of a few rows, eagerly and compiled, against the readable loop; a dropped
    assignment (expert id E) contributes nothing."""
    torch.manual_seed(0)
    E, Dm, H, T = 4, 16, 24, 3
    wg = torch.randn(E, H, Dm) if activation == "swiglu" else None
    wu, wd = torch.randn(E, H, Dm), torch.randn(E, Dm, H)
    x = torch.randn(T, Dm)
    token = torch.tensor([0, 0, 1, 1, 2, 2])
    expert = torch.tensor([1, 3, 0, 4, 2, 1])  # 4 = E: dropped
    weight = torch.rand(6)
    keep = expert < E
    want = loop_experts_reference(x, token[keep], expert[keep], weight[keep], wg, wu, wd, activation)
    # the reductions sum in their own order: equal to fp32 rounding of values of size ~10
    torch.testing.assert_close(_gathered_forward(x, token, expert, weight, wg, wu, wd, activation), want,
                               atol=1e-4, rtol=1e-5)
    compiled = torch.compile(_gathered_forward, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x, token, expert, weight, wg, wu, wd, activation), want,
                               atol=1e-4, rtol=1e-5)
