"""Offloaded == resident, bit for bit: greedy tokens and logits, every layout, budget, policy and prefetch.

Budgets: top-k experts (one layer's minimum: the prefill needs more and runs in chunks), a few layers'
worth, 0 (no cache) and all.
"""
from __future__ import annotations

import pytest
import torch

from moekit.hf import load_any
from moekit.infer.generate import generate
from moekit.infer.offload import load_offloaded
from moekit.ops import gemv

from .conftest import EXPERT_BYTES, K, prompts

BUDGETS = [K * EXPERT_BYTES, 5 * EXPERT_BYTES, 0, "all"]
NEW = 10


def _run(model, ids, mask):
    with torch.no_grad():
        out = generate(model, ids, NEW, temperature=0, attention_mask=mask)
        full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], NEW)], 1)
        logits = model(out, attention_mask=full_mask).logits
    return out, logits


@pytest.fixture(scope="module")
def reference(checkpoints):
    ids, mask = prompts()
    return {name: _run(load_any(path)[0], ids, mask) for name, path in checkpoints.items()}


@pytest.mark.parametrize("layout", ["moekit", "hf", "hf_fused"])
@pytest.mark.parametrize("budget", BUDGETS, ids=["topk", "5experts", "0", "all"])
@pytest.mark.parametrize("policy,prefetch", [("lru", True), ("lru", False), ("lfu", True), ("lfu", False)])
def test_offloaded_equals_resident(checkpoints, reference, layout, budget, policy, prefetch):
    ids, mask = prompts()
    om = load_offloaded(checkpoints[layout], budget, policy=policy, prefetch=prefetch)
    try:
        tokens, logits = _run(om.model, ids, mask)
        st = om.stats()
    finally:
        om.close()
    ref_tokens, ref_logits = reference[layout]
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(logits, ref_logits)
    assert st["accesses"] > 0 and st["bytes_read"] > 0
    if budget == 0:
        assert st["hits"] <= st["prefetch_hits"]  # nothing is reused across calls without a cache
    if not prefetch:
        assert st["prefetched"] == 0


def test_all_layouts_agree(reference):
    """The three checkpoints hold the same weights, so each layout is really read. Only close, not equal:
    the resident loads place the weights at different addresses (memory-mapped vs copied), and the
    GEMMs' rounding depends on the operands' alignment; that is why the slots copy the resident one."""
    a = reference["moekit"]
    for other in (reference["hf"], reference["hf_fused"]):
        assert torch.equal(a[0], other[0])
        torch.testing.assert_close(a[1], other[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("read", ["pread", "mmap"])
def test_read_paths_and_dtype_cast(checkpoints, read):
    """bf16 from an fp32 file: the same cast as the resident load; both read paths."""
    ids, mask = prompts()
    ref = _run(load_any(checkpoints["hf"], "bfloat16")[0], ids, mask)
    om = load_offloaded(checkpoints["hf"], 3 * EXPERT_BYTES // 2, policy="lru", read=read, dtype="bfloat16")
    try:
        got = _run(om.model, ids, mask)
    finally:
        om.close()
    assert got[1].dtype == torch.bfloat16
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_non_experts_resident_experts_not(checkpoints):
    om = load_offloaded(checkpoints["moekit"], K * EXPERT_BYTES)
    try:
        names = list(om.model.state_dict())
        assert not any(".ffn.experts." in n for n in names)
        assert any(n.endswith("router.weight") for n in names)
        assert om.cache.stats()["slots_allocated"] == 0  # nothing read before the first call
    finally:
        om.close()


@pytest.mark.parametrize("layout", ["moekit", "hf_fused"])
def test_streaming_kernels_keep_offloaded_equal_to_resident(checkpoints, monkeypatch, layout):
    """With every weight large enough for the single-row kernels (batch-1 decode), both models take them
    on the same bits: the experts' fused kernel included, whether read from the cache or the disk."""
    monkeypatch.setattr(gemv, "MIN_BYTES", 0)
    ran: list[str] = []
    run = gemv._KERNELS.run
    monkeypatch.setattr(gemv._KERNELS, "run", lambda name, *a: ran.append(name) or run(name, *a))
    ids = prompts()[0][:1]
    resident = _run(load_any(checkpoints[layout])[0], ids, torch.ones_like(ids))
    assert {"gemv", "swiglu_expert"} <= set(ran)
    ran.clear()
    om = load_offloaded(checkpoints[layout], K * EXPERT_BYTES, policy="lru", prefetch=True)
    try:
        offloaded = _run(om.model, ids, torch.ones_like(ids))
    finally:
        om.close()
    assert "swiglu_expert" in ran
    assert torch.equal(offloaded[0], resident[0]) and torch.equal(offloaded[1], resident[1])
