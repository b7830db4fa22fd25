"""Sampling filters on a hand-made distribution: top-k and top-p keep exactly the expected support."""
from __future__ import annotations

import math

import pytest
import torch

from moekit.infer import filter_logits, sample_next

PROBS = [0.05, 0.5, 0.1, 0.2, 0.15]  # sorted: token 1 (0.5), 3 (0.2), 4 (0.15), 2 (0.1), 0 (0.05)
LOGITS = torch.tensor([PROBS]).log()


def _support(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


@pytest.mark.parametrize(("top_k", "top_p", "support"), [
    (None, None, {0, 1, 2, 3, 4}),
    (1, None, {1}),
    (2, None, {1, 3}),
    (3, None, {1, 3, 4}),
    (5, None, {0, 1, 2, 3, 4}),
    (50, None, {0, 1, 2, 3, 4}),  # k above V keeps everything
    (None, 0.3, {1}),  # 0.5 alone reaches 0.3
    (None, 0.6, {1, 3}),  # 0.5 < 0.6 <= 0.7
    (None, 0.8, {1, 3, 4}),  # 0.7 < 0.8 <= 0.85
    (None, 0.9, {1, 2, 3, 4}),  # 0.85 < 0.9 <= 0.95
    (None, 0.99, {0, 1, 2, 3, 4}),
    (None, 1.0, {0, 1, 2, 3, 4}),
    (3, 0.6, {1, 3}),  # top-k first, then the nucleus of the renormalised top 3
    (2, 0.99, {1, 3}),
    (3, 0.75, {1, 3}),  # renormalised over the top 3: 0.5/0.85 = 0.59 < 0.75 <= 0.82
])
def test_filter_logits_support(top_k, top_p, support):
    out = filter_logits(LOGITS, top_k, top_p)
    assert _support(out) == support
    kept = sorted(support)
    torch.testing.assert_close(out[0, kept], LOGITS[0, kept])  # kept logits are untouched
    assert torch.equal(LOGITS, torch.tensor([PROBS]).log())  # the input is not modified


def test_filter_logits_is_per_row():
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=1)).tolist()
    assert kept == [[False, False, True], [True, False, False]]


@pytest.mark.parametrize(("top_k", "top_p", "support"), [(2, None, {1, 3}), (None, 0.8, {1, 3, 4})])
def test_samples_stay_in_the_support_with_the_renormalised_frequencies(top_k, top_p, support):
    g = torch.Generator().manual_seed(0)
    n = 4000
    draws = sample_next(LOGITS.expand(n, -1), 1.0, top_k, top_p, generator=g)
    assert set(draws.tolist()) == support
    mass = sum(PROBS[i] for i in support)
    for i in support:
        freq = (draws == i).float().mean().item()
        p = PROBS[i] / mass
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n), (i, freq, p)


def test_temperature():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.0]])
    assert sample_next(logits, 0.0).tolist() == [1, 0]  # greedy
    g = torch.Generator().manual_seed(0)
    cold = sample_next(logits.repeat(500, 1), 0.05, generator=g)  # near-greedy
    assert (cold.view(500, 2) == torch.tensor([1, 0])).float().mean() > 0.99
    hot = sample_next(logits[:1].expand(3000, -1), 100.0, generator=g)  # near-uniform
    assert all(abs((hot == i).float().mean().item() - 1 / 3) < 0.05 for i in range(3))


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(1))
    a = sample_next(logits, 0.9, 20, 0.9, generator=torch.Generator().manual_seed(7))
    b = sample_next(logits, 0.9, 20, 0.9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [{"top_k": 0}, {"top_k": 1.5}, {"top_p": 0.0}, {"top_p": 1.5},
                                 {"temperature": -0.1}])
def test_invalid_sampling_arguments(bad):
    kw = {"temperature": 1.0, "top_k": None, "top_p": None} | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        sample_next(LOGITS, **kw)
