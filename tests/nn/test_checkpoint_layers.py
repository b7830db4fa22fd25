"""The layers added for real checkpoints, each reduced to the plain layer it generalises or checked against
a readable formula: attention sinks, sliding windows and their trimmed KV cache, biased / clamped experts,
mixture of attention heads, SparseMixer routing, scaled RoPE tables.

Legend: B batch, S sequence, H heads, d head dim, T tokens, D model dim, E experts.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moekit.config import ModelConfig, MoEConfig
from moekit.config.rope import RopeScaling
from moekit.functional.routing_sparsemixer import sparsemixer_route
from moekit.model import MoETransformer
from moekit.nn.attention import Attention, rope_cos_sin, sink_attention
from moekit.nn.biased_experts import BiasedExperts, clamped_swiglu
from moekit.nn.experts import GroupedExperts
from moekit.nn.moa import MixtureOfAttention
from moekit.nn.rope import rope_inv_freq, rope_tables


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sinks_at_minus_infinity_are_plain_attention():
    q, k, v = (torch.randn(2, 4, 5, 8, generator=_g(i)) for i in range(3))
    out = sink_attention(q, k, v, None, torch.full((4,), -1e30))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_sink_takes_its_share():
    """One key and a sink of logit s: the output is v * e^qk / (e^qk + e^s)."""
    q, k, v = torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4), torch.full((1, 1, 1, 4), 3.0)
    out = sink_attention(q, k, v, None, torch.tensor([1.5]))
    share = math.exp(2.0) / (math.exp(2.0) + math.exp(1.5))  # q.k / sqrt(4) = 2
    torch.testing.assert_close(out, v * share)


def test_window_trimmed_cache_decodes_like_the_full_one():
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, max_seq_len=64, sliding_window=3,
                      sliding_layers=(0,), attn_sinks=True, moe=MoEConfig(d_model=16, d_hidden=8, num_experts=2))
    torch.manual_seed(0)
    model = MoETransformer(cfg).eval()
    ids = torch.randint(0, 50, (2, 7), generator=_g())
    with torch.no_grad():
        full = model(torch.cat([ids, ids[:, :3]], dim=1)).logits[:, -3:]
        cache = model.new_kv_cache()
        model(ids, kv_cache=cache)
        steps = [model(ids[:, i : i + 1], kv_cache=cache).logits[:, -1] for i in range(3)]
    assert [c.shape[2] for c in cache.k] == [2, 10] and cache.length == 10
    torch.testing.assert_close(torch.stack(steps, 1), full)


def test_biased_experts_without_bias_or_clamp_are_grouped_experts():
    grouped = GroupedExperts(3, 8, 6, "swiglu", "loop")
    biased = BiasedExperts(3, 8, 6, bias=False)
    biased.load_state_dict(grouped.state_dict())
    x, tok, exp, w = torch.randn(5, 8, generator=_g()), torch.tensor([0, 1, 2, 4]), torch.tensor([2, 0, 1, 3]), \
        torch.rand(4, generator=_g(1))
    torch.testing.assert_close(biased(x, tok, exp, w), grouped(x, tok, exp, w))  # expert 3 = dropped


def test_clamped_swiglu_formula():
    g, u = torch.tensor([-10.0, 0.5, 9.0]), torch.tensor([-9.0, 0.25, 9.0])
    want = [(-7.0 + 1) * (-10 / (1 + math.exp(17.02))), 1.25 * 0.5 / (1 + math.exp(-0.851)),
            8.0 * 7.0 / (1 + math.exp(-11.914))]
    torch.testing.assert_close(clamped_swiglu(g, u, 1.702, 7.0), torch.tensor(want))


def test_one_attention_expert_is_plain_attention():
    D, h, d = 16, 2, 8
    moa, attn = MixtureOfAttention(D, 1, 1, h, d), Attention(D, h, h, d)
    with torch.no_grad():
        for p in moa.parameters():
            p.normal_(generator=_g()).mul_(0.3)
        moa.bias.zero_()
        attn.q_proj.weight.copy_(moa.w_q[0])
        attn.o_proj.weight.copy_(moa.w_o[0])
        attn.k_proj.weight.copy_(moa.kv_proj.weight[: h * d])
        attn.v_proj.weight.copy_(moa.kv_proj.weight[h * d :])
    x = torch.randn(2, 5, D, generator=_g(2))
    cos, sin = rope_cos_sin(torch.arange(5).expand(2, 5), d, 1e4, torch.float32)
    torch.testing.assert_close(moa(x, cos, sin, None), attn(x, cos, sin, None))


def test_sparsemixer_weights():
    """eps = 0: each pick is alone in its neighbourhood (weight 1); a wide eps weights it among all."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    r = sparsemixer_route(logits, 0.0)
    assert r.indices_TK.tolist() == [[0, 1]] and r.weights_TK.tolist() == [[1.0, 1.0]]
    wide = sparsemixer_route(logits, 10.0)
    p = logits.softmax(-1)
    torch.testing.assert_close(wide.weights_TK, torch.stack([p[:, 0], logits[:, 1:].softmax(-1)[:, 0]], -1))


def test_rope_scaling_reductions():
    pos = torch.arange(40).unsqueeze(0)
    cfg = ModelConfig(rope_scaling=RopeScaling(rope_type="linear", factor=1.0))
    torch.testing.assert_close(rope_tables(pos, cfg, torch.float32), rope_cos_sin(pos, cfg.rope_dim, 1e4, torch.float32))
    base, _ = rope_inv_freq(32, 1e4, RopeScaling(rope_type="linear", factor=1.0), 0)
    lin, _ = rope_inv_freq(32, 1e4, RopeScaling(rope_type="linear", factor=4.0), 0)
    torch.testing.assert_close(lin, base / 4)
    # dynamic NTK: unchanged within the original context, a larger base past it
    dyn = RopeScaling(rope_type="dynamic", factor=2.0, original_max_position_embeddings=16)
    torch.testing.assert_close(rope_inv_freq(32, 1e4, dyn, 10)[0], base)
    assert (rope_inv_freq(32, 1e4, dyn, 40)[0][1:] < base[1:]).all()
    # yarn: the fastest frequency kept, the slowest interpolated, cos / sin scaled by 0.1 ln(factor) + 1
    yarn, attn = rope_inv_freq(32, 1e4, RopeScaling(rope_type="yarn", factor=8.0,
                                                    original_max_position_embeddings=64), 0)
    torch.testing.assert_close(yarn[[0, -1]], torch.stack([base[0], base[-1] / 8]))
    assert math.isclose(attn, 0.1 * math.log(8.0) + 1)


def test_longrope_switches_past_the_original_context():
    r = RopeScaling(rope_type="longrope", factor=4.0, original_max_position_embeddings=16,
                    short_factor=(1.0, 2.0), long_factor=(3.0, 5.0), short_mscale=1.1, long_mscale=1.3)
    base, _ = rope_inv_freq(4, 1e4, RopeScaling(rope_type="linear", factor=1.0), 0)
    short, m_short = rope_inv_freq(4, 1e4, r, 16)
    long, m_long = rope_inv_freq(4, 1e4, r, 17)
    torch.testing.assert_close(short, base / torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(long, base / torch.tensor([3.0, 5.0]))
    assert (m_short, m_long) == (1.1, 1.3)
