"""MoETransformer forward: shapes, causality, padding that is invisible, layer placement, parameter counts.

Legend: B batch, S sequence, P appended padding, V vocabulary, E experts, K top-k.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.config import ModelConfig, MoEConfig
from moekit.nn.experts import MLP
from moekit.nn.moe import MoELayer
from moekit.nn.transformer import MoETransformer

V, E = 64, 4
ROUTERS = ["topk", "switch", "noisy_topk", "sigmoid_bias", "expert_choice", "dense"]
# token-choice routers without a capacity limit see each token alone: the only ones that can be causal
CAUSAL_ROUTERS = ["topk", "switch", "noisy_topk", "sigmoid_bias", "dense"]


@pytest.mark.parametrize("router", ROUTERS)
def test_forward_shapes_and_stats(router, tiny_model, tokens):
    model = tiny_model(router)
    x_BS = tokens(3, 10)
    out = model(x_BS, labels=tokens(3, 10, seed=1))
    assert out.logits.shape == (3, 10, V) and out.logits.dtype == torch.float32
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert out.aux_loss.shape == () and torch.isfinite(out.aux_loss)
    assert out.kv_cache is None
    assert sorted(out.stats) == [0, 1]
    for s in out.stats.values():
        assert s.tokens_per_expert.shape == (E,)
        assert s.num_tokens == 30
        if router in ("topk", "switch", "noisy_topk", "sigmoid_bias"):  # dropless token choice: T * K
            assert int(s.tokens_per_expert.sum()) == 30 * model.config.moe.top_k
        if router == "dense":
            assert s.tokens_per_expert.tolist() == [30] * E


def test_loss_is_mean_cross_entropy_over_non_ignored_labels(tiny_model, tokens):
    model = tiny_model()
    x_BS, y_BS = tokens(2, 8), tokens(2, 8, seed=1)
    y_BS[0, :3] = -100
    out = model(x_BS, labels=y_BS)
    keep = y_BS != -100
    expected = F.cross_entropy(out.logits[keep], y_BS[keep])
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match="input_ids must be"):
        model(x_BS[0])
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        model(tokens(1, 65))


@pytest.mark.parametrize("router", CAUSAL_ROUTERS)
def test_causal_a_later_token_does_not_change_earlier_logits(router, tiny_model, tokens):
    model = tiny_model(router)
    x_BS = tokens(2, 12)
    j = 7
    changed = x_BS.clone()
    changed[:, j] = (changed[:, j] + 1) % V
    a, b = model(x_BS).logits, model(changed).logits
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a[:, j:], b[:, j:])  # the change is visible from position j on


def _assert_same_routing(stats_a, stats_b):
    assert stats_a.keys() == stats_b.keys()
    for layer in stats_a:
        a, b = stats_a[layer], stats_b[layer]
        assert a.num_tokens == b.num_tokens
        assert a.tokens_per_expert.tolist() == b.tokens_per_expert.tolist(), f"layer {layer}"
        assert int(a.dropped) == int(b.dropped) and int(a.num_assignments) == int(b.num_assignments)
        for name in ("balance_loss", "z_loss", "importance_loss", "router_entropy"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), msg=f"layer {layer} {name}")


PAD_CASES = {
    **{r: {"router": r} for r in ROUTERS},
    "topk_capacity": {"router": "topk", "moe": {"capacity_factor": 0.8}},
    "topk_seq_aux_importance": {"router": "topk", "moe": {"seq_aux": True, "importance_loss_coef": 0.1}},
    "switch_jitter": {"router": "switch", "moe": {"router_jitter": 0.1}},
}


@pytest.mark.parametrize("case", list(PAD_CASES))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_padding_is_not_routed_nor_in_any_loss_or_statistic(case, mode, tiny_model, tokens):
    """Appending right padding (with arbitrary token ids) changes nothing: logits of real positions,
    LM loss, aux loss and every routing statistic. In train mode the router noise and jitter are drawn
    for real tokens only, so the same seed gives the same result with and without padding."""
    kw = dict(PAD_CASES[case])
    model = tiny_model(kw.pop("router"), **kw).train(mode == "train")
    B, S, P = 2, 9, 5
    x_BS, y_BS = tokens(B, S), tokens(B, S, seed=1)
    mask_BS = torch.ones(B, S, dtype=torch.long)
    mask_BS[1, 6:] = 0  # row 1 is already shorter: its last 3 positions are padding too
    results = []
    for pad_seed in (None, 2, 3):
        if pad_seed is None:
            x, y, m = x_BS, y_BS, mask_BS
        else:  # P more padding positions holding different junk tokens and labels each time
            x = torch.cat([x_BS, tokens(B, P, seed=pad_seed)], dim=1)
            y = torch.cat([y_BS, tokens(B, P, seed=pad_seed + 10)], dim=1)
            m = torch.cat([mask_BS, torch.zeros(B, P, dtype=torch.long)], dim=1)
            x[1, 6:S] = tokens(1, S - 6, seed=pad_seed + 20)  # junk in the shorter row's padding as well
        torch.manual_seed(123)
        results.append(model(x, labels=y, attention_mask=m))
    base = results[0]
    real = mask_BS.bool()
    for out in results[1:]:
        torch.testing.assert_close(out.logits[:, :S][real], base.logits[real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.loss, base.loss)
        torch.testing.assert_close(out.aux_loss, base.aux_loss)
        _assert_same_routing(out.stats, base.stats)
    for s in base.stats.values():
        assert s.num_tokens == int(mask_BS.sum())


def test_padding_masks_the_labels_too(tiny_model, tokens):
    model = tiny_model()
    x, y = tokens(1, 8), tokens(1, 8, seed=1)
    m = torch.ones(1, 8, dtype=torch.long)
    m[0, 5:] = 0
    y_ignored = y.clone()
    y_ignored[0, 5:] = -100
    torch.testing.assert_close(model(x, labels=y, attention_mask=m).loss,
                               model(x, labels=y_ignored, attention_mask=m).loss)


@pytest.mark.parametrize(("n_layers", "kw", "moe_layers"), [
    (4, {}, [0, 1, 2, 3]),
    (4, {"moe_every": 2}, [1, 3]),
    (4, {"moe_every": 3}, [2]),
    (4, {"first_dense_layers": 1}, [1, 2, 3]),
    (6, {"moe_every": 2, "first_dense_layers": 1}, [1, 3, 5]),
    (6, {"moe_every": 2, "first_dense_layers": 2}, [3, 5]),
    (4, {"first_dense_layers": 4}, []),
    (4, {"dense_layers": (0, 2)}, [1, 3]),
    (4, {"moe_every": 2, "dense_layers": (3,)}, [1]),
    (4, {"dense": True}, []),
    (4, {"dense": True, "moe_every": 2}, []),
])
def test_layer_placement(n_layers, kw, moe_layers, tiny_model, tokens, tmp_path):
    model = tiny_model(n_layers=n_layers, **kw)
    cfg = model.config
    for i, block in enumerate(model.layers):
        assert block.is_moe == (i in moe_layers) == cfg.is_moe_layer(i)
        if i in moe_layers:
            assert isinstance(block.ffn, MoELayer)
        else:  # dense layers: a SwiGLU MLP of width top_k * expert hidden (same active FFN size)
            assert isinstance(block.ffn, MLP) and block.ffn.up_proj.weight.shape == (2 * 64, 32)
    assert len(model.moe_layers()) == len(moe_layers)
    out = model(tokens(1, 5))
    assert sorted(out.stats) == moe_layers
    if not moe_layers:
        assert float(out.aux_loss) == 0.0
    cfg.to_json(tmp_path / "config.json")  # placement survives the JSON round trip
    assert ModelConfig.from_json(tmp_path / "config.json") == cfg


def _attn_params(D, Hq, Hk, hd):
    return D * Hq * hd + 2 * D * Hk * hd + Hq * hd * D  # q, k, v, o


@pytest.mark.parametrize("tied", [True, False])
def test_num_params_by_hand(tied):
    """V=64, D=32, 2 layers, 2 heads of 16, 4 experts (SwiGLU, H=64), top-2."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, tie_embeddings=tied,
                      moe=MoEConfig(d_model=32, d_hidden=64, num_experts=4, top_k=2))
    embed = 64 * 32  # 2048
    per_layer = (32 * 32 * 4  # attention: 4 square 32x32 projections = 4096
                 + 2 * 32  # two RMSNorms
                 + 4 * 32  # router
                 + 4 * 3 * 64 * 32)  # experts: gate, up, down of 64x32 each = 24576
    total = embed + 2 * per_layer + 32 + (0 if tied else 64 * 32)
    assert total == (59808 if tied else 61856)
    inactive = 2 * (4 - 2) * 3 * 64 * 32  # per MoE layer, E - K experts sit idle for a token
    assert MoETransformer(cfg).num_params() == {"total_params": total, "active_params": total - inactive}


@pytest.mark.parametrize("tied", [True, False])
def test_num_params_by_hand_mixed_model(tied):
    """GQA, noisy router (w_noise), GELU experts (no gate), a shared expert, a dense first layer;
    the sigmoid_bias expert_bias is a buffer, not a parameter."""
    V, D, L, Hq, Hk, hd, Ex, Hx, K, Hs, Hd = 50, 24, 3, 4, 2, 6, 6, 16, 2, 20, 40
    for router, router_params in (("noisy_topk", 2 * Ex * D), ("sigmoid_bias", Ex * D)):
        moe = MoEConfig(d_model=D, d_hidden=Hx, num_experts=Ex, top_k=K, router=router, activation="gelu",
                        num_shared_experts=1, shared_d_hidden=Hs)
        cfg = ModelConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=Hq, n_kv_heads=Hk, tie_embeddings=tied,
                          first_dense_layers=1, dense_d_hidden=Hd, moe=moe)
        attn_and_norms = _attn_params(D, Hq, Hk, hd) + 2 * D
        dense_ffn = 3 * D * Hd  # SwiGLU MLP
        moe_ffn = router_params + Ex * 2 * Hx * D + 2 * D * Hs  # GELU experts: up + down; shared: up + down
        total = V * D * (1 if tied else 2) + L * attn_and_norms + dense_ffn + (L - 1) * moe_ffn + D
        inactive = (L - 1) * (Ex - K) * 2 * Hx * D
        got = MoETransformer(cfg).num_params()
        assert got == {"total_params": total, "active_params": total - inactive}, router
    # a dense router runs every expert: nothing is inactive
    dense_router = ModelConfig(vocab_size=V, d_model=D, n_layers=1, n_heads=Hq,
                               moe=MoEConfig(d_model=D, d_hidden=Hx, num_experts=Ex, router="dense"))
    n = MoETransformer(dense_router).num_params()
    assert n["active_params"] == n["total_params"]
