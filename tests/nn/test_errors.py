"""Bad input raises ValueError naming the field and the offending value."""
from __future__ import annotations

import re

import pytest
import torch

from moekit import MoEConfig, MoELayer

BASE = {"d_model": 8, "d_hidden": 12, "num_experts": 4, "top_k": 2}


def mentions(*parts: str) -> str:
    """A regex that matches a message containing every part, in any order."""
    return "(?s)" + "".join(f"(?=.*{re.escape(p)})" for p in parts)


@pytest.mark.parametrize(
    "change,parts",
    [
        ({"top_k": 0}, ["top_k", "0"]),
        ({"top_k": -1}, ["top_k", "-1"]),
        ({"top_k": 5}, ["top_k", "5", "num_experts"]),
        ({"capacity_factor": 0.0}, ["capacity_factor", "0"]),
        ({"capacity_factor": -0.5}, ["capacity_factor", "-0.5"]),
        ({"router": "top2"}, ["router", "top2"]),
        ({"activation": "tanh"}, ["activation", "tanh"]),
        ({"drop_policy": "random"}, ["drop_policy", "random"]),
        ({"expert_impl": "cuda"}, ["expert_impl", "cuda"]),
        ({"router": "switch", "top_k": 2}, ["top_k", "2", "switch"]),
        ({"num_experts": 0, "top_k": 1}, ["num_experts", "0"]),
        ({"d_model": 0}, ["d_model", "0"]),
        ({"router": "sigmoid_bias", "n_group": 3}, ["n_group", "3", "num_experts"]),
        ({"router": "sigmoid_bias", "n_group": 2, "topk_group": 3}, ["topk_group", "3"]),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None,
)
def test_bad_config(change, parts):
    with pytest.raises(ValueError, match=mentions(*parts)):
        MoEConfig(**{**BASE, **change})


def test_input_last_dim_not_d_model():
    layer = MoELayer(MoEConfig(**BASE))
    with pytest.raises(ValueError, match=mentions("d_model", "8", "7")):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match=mentions("d_model", "8", "16")):
        layer(torch.randn(2, 3, 16))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_floating_input(dtype):
    layer = MoELayer(MoEConfig(**BASE))
    with pytest.raises(ValueError, match=mentions("float", str(dtype))):
        layer(torch.ones(3, 8).to(dtype))


def test_token_mask_of_wrong_shape():
    layer = MoELayer(MoEConfig(**BASE))
    with pytest.raises(ValueError, match=mentions("token_mask", "(2, 4)", "(2, 3)")):
        layer(torch.randn(2, 3, 8), token_mask=torch.ones(2, 4, dtype=torch.bool))
