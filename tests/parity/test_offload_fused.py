"""Experts offloaded from checkpoints that transformers itself wrote with fused expert tensors: GraniteMoE and
JetMoE (``input_linear`` (E, 2H, D), ``output_linear`` (E, D, H)), DBRX (``w1`` / ``v1`` / ``w2`` as
(E·H, D), ``w2`` holding each expert's down matrix transposed) and gpt-oss (``gate_up_proj`` (E, D, 2H) with
gate and up in alternate columns, ``down_proj`` (E, H, D), biases kept resident, the clamped SwiGLU).
Offloaded == resident bit for bit (tokens and logits; budgets top-k, 0 and all; LRU and LFU; prefetch on
and off; pread and mmap), and both close to transformers' own logits; gpt-oss's published MXFP4 experts
too."""

from __future__ import annotations

import shutil

import pytest
import torch
from _hf_parity import COMMON, TOL, batch, build_hf, hf_logits, max_diff, transformers
from test_convert_new_families import CASES, SKIP_COMMON

from moekit.hf import load_any
from moekit.infer.generate import generate
from moekit.infer.offload import load_offloaded
from moekit.infer.store import StoreError

FUSED = ("granitemoe", "jetmoe", "dbrx", "gpt_oss")
NEW = 6


def _build(case: str, path):
    cls, kw = CASES[case]
    common = {k: v for k, v in COMMON.items() if k not in SKIP_COMMON.get(case, ())}
    return build_hf(getattr(transformers, cls)(**{**common, **kw}), path)


@pytest.fixture(scope="module", params=FUSED)
def fused_ckpt(request, tmp_path_factory):
    """(case, checkpoint dir, transformers model, resident (tokens, logits))."""
    path = tmp_path_factory.mktemp(request.param)
    ref = _build(request.param, path)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests run (conftest's per-test fixture comes after this one)
    try:
        return request.param, path, ref, _run(load_any(path)[0])
    finally:
        torch.set_num_threads(before)


def _run(model):
    ids, mask = batch(COMMON["vocab_size"], 1)
    with torch.no_grad():
        out = generate(model, ids, NEW, temperature=0, attention_mask=mask)
        full = torch.cat([mask, mask.new_ones(mask.shape[0], NEW)], 1)
        return out, model(out, attention_mask=full).logits


def _expert_bytes(path) -> tuple[int, int]:
    om = load_offloaded(path, "all")
    try:
        return om.cache.expert_bytes, om.model.config.moe.top_k
    finally:
        om.close()


@pytest.mark.parametrize("budget", ["topk", 0, "all"])
@pytest.mark.parametrize("policy,prefetch,read", [("lru", True, "pread"), ("lfu", False, "pread"),
                                                  ("lru", False, "mmap")])
def test_fused_offloaded_equals_resident(fused_ckpt, budget, policy, prefetch, read):
    case, path, _, (ref_tokens, ref_logits) = fused_ckpt
    if budget == "topk":
        nbytes, k = _expert_bytes(path)
        budget = k * nbytes
    om = load_offloaded(path, budget, policy=policy, prefetch=prefetch, read=read)
    try:
        tokens, logits = _run(om.model)
        st = om.stats()
    finally:
        om.close()
    assert torch.equal(tokens, ref_tokens), case
    assert torch.equal(logits, ref_logits), case
    assert st["bytes_read"] > 0


def test_fused_offloaded_matches_transformers(fused_ckpt):
    """The offloaded model reads the right rows: its logits are transformers' on the same checkpoint."""
    case, path, ref, _ = fused_ckpt
    ids, mask = batch(COMMON["vocab_size"], 1)
    om = load_offloaded(path, 0)
    try:
        with torch.no_grad():
            ours = om.model(ids, attention_mask=mask).logits
    finally:
        om.close()
    assert max_diff(ours, hf_logits(ref, ids, mask), mask) <= TOL, case


def test_truncated_dbrx_w2_named_at_load(tmp_path):
    _build("dbrx", tmp_path / "src")
    shutil.copytree(tmp_path / "src", tmp_path / "dst")
    shard = next((tmp_path / "dst").glob("*.safetensors"))
    with open(shard, "r+b") as f:  # a single shard: the last tensor in it ends past the new end
        f.truncate(shard.stat().st_size - 64)
    with pytest.raises((StoreError, ValueError)) as err:
        load_offloaded(tmp_path / "dst", "all")
    assert str(shard) in str(err.value) and "truncated" in str(err.value)


@pytest.mark.parametrize("read", ["pread", "mmap"])
def test_mxfp4_experts_offloaded_equal_resident(tmp_path, read):
    """gpt-oss as published: expert blocks and scales in MXFP4, read per expert (about a quarter of the bf16
    bytes) and dequantized into the cache slots as the resident load dequantizes them."""
    from test_gpt_oss_mxfp4 import CONFIG, _quantize_checkpoint

    build_hf(transformers.GptOssConfig(**CONFIG), tmp_path / "fp32")
    _quantize_checkpoint(tmp_path / "fp32", tmp_path / "mxfp4")
    ref_tokens, ref_logits = _run(load_any(tmp_path / "mxfp4")[0])
    for budget in (0, "all"):
        om = load_offloaded(tmp_path / "mxfp4", budget, read=read)
        try:
            tokens, logits = _run(om.model)
            st = om.stats()
        finally:
            om.close()
        assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits), budget
        assert 0 < st["bytes_read"] < (st["misses"] + st["prefetched"]) * st["expert_bytes"] / 3  # MXFP4, not fp32


def test_gpt_oss_reads_each_interleaved_row_once(fused_ckpt):
    """gate and up of a gpt-oss expert share one (D, 2H) row of the file: it is read once, so an expert
    costs its weights' bytes, as for every other layout."""
    case, path, _, _ = fused_ckpt
    om = load_offloaded(path, 0, prefetch=False)  # a queued prefetch evicted before its read is never read
    try:
        ids, _ = batch(COMMON["vocab_size"], 1)
        with torch.no_grad():
            om.model(ids[:, -1:])
        st = om.stats()
    finally:
        om.close()
    assert st["bytes_read"] == st["misses"] * st["expert_bytes"] > 0, case
