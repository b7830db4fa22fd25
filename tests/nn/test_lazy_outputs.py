"""aux_loss and stats are computed when first read, in the grad mode of the forward call."""
from __future__ import annotations

import pytest
import torch

from moekit.config import MoEConfig
from moekit.model import ModelConfig, MoETransformer
from moekit.nn.moe import MoELayer, MoEOutput


def _layer() -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(MoEConfig(d_model=8, d_hidden=12, num_experts=4, top_k=2, z_loss_coef=1e-3,
                              importance_loss_coef=0.1))


def test_reading_aux_under_no_grad_keeps_the_forward_grad_mode():
    layer = _layer()
    out = layer(torch.randn(3, 5, 8))
    with torch.no_grad():
        logged = float(out.aux_loss)  # first read happens under no_grad (e.g. a logger)
    assert out.aux_loss.requires_grad  # ... yet the training loss still gets a differentiable aux
    out.aux_loss.backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    assert float(out.aux_loss.detach()) == logged


def test_no_grad_forward_gives_values_without_graph_and_equal_to_grad_forward():
    layer = _layer()
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        a = layer(x)
    b = layer(x)
    assert not a.aux_loss.requires_grad
    torch.testing.assert_close(a.aux_loss, b.aux_loss.detach())
    assert torch.equal(a.stats.tokens_per_expert, b.stats.tokens_per_expert)
    da, db = a.stats.to_dict(), b.stats.to_dict()
    assert da.pop("tokens_per_expert") == db.pop("tokens_per_expert")
    assert da == pytest.approx(db)


def test_explicit_construction_and_bad_construction():
    layer = _layer()
    out = layer(torch.randn(4, 8))
    copy = MoEOutput(out.output, out.aux_loss, out.stats)
    assert copy.aux_loss is out.aux_loss and copy.stats is out.stats
    with pytest.raises(ValueError, match="aux_loss and stats"):
        MoEOutput(out.output)


def test_model_output_aux_is_the_sum_of_layer_aux_and_keeps_grad_mode():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, d_model=8, n_layers=3, n_heads=2, max_seq_len=16,
                      moe=MoEConfig(d_model=8, d_hidden=12, num_experts=4, top_k=2))
    model = MoETransformer(cfg)
    ids = torch.randint(0, 32, (2, 7))
    layer_aux = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: layer_aux.append(out)) for m in model.moe_layers()]
    out = model(ids)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        total = out.aux_loss
    assert total.requires_grad
    torch.testing.assert_close(total, sum(o.aux_loss for o in layer_aux))
    assert sorted(out.stats) == [0, 1, 2]
    assert all(torch.equal(out.stats[i].tokens_per_expert, layer_aux[i].stats.tokens_per_expert) for i in range(3))
