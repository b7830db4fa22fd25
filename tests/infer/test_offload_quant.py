"""Offloaded quantized runs == the resident quantized model, bit for bit; the cache holds stored bytes.

The quantized runs are ``tiny_model(0)`` (tests/infer/conftest.py) rounded to int8 and int4 (group 32) by
``moekit.compress.quantize`` and saved as run directories; the reference is ``RunDir(run).load_model()``.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from moekit.compress.quantize import quantize_model, save_quantized
from moekit.config import QuantSpec
from moekit.functional.quant import decode_int8_scale, dequantize, quantize
from moekit.infer.generate import generate
from moekit.infer.offload import load_offloaded
from moekit.infer.store import StoreError
from moekit.nn.quantized import expert_linear, expert_scales
from moekit.rundir import RunDir

from .conftest import EXPERT_BYTES, LAYERS, D, E, H, K, prompts, tiny_model

NEW = 8
GROUP = 32
# stored bytes of one swiglu expert, counted from the format's definition (functional/quant.py)
STORED = {"int8": 3 * H * D + (2 * H + D) + 3 * 4,  # int8 weights, a uint8 scale code per row, an fp32 base each
          "int4": 3 * H * D // 2 + 3 * H * D // GROUP * 2}  # two nibbles a byte, an fp16 scale per group


@pytest.fixture(scope="module")
def qruns(checkpoints, tmp_path_factory) -> dict[str, RunDir]:
    root = tmp_path_factory.mktemp("qruns")
    src = RunDir(checkpoints["moekit"])
    out = {}
    for fmt, group in (("int8", None), ("int4", GROUP)):
        model = quantize_model(tiny_model(0), QuantSpec(fmt, group, method="rtn"))
        out[fmt] = RunDir(root / fmt)
        save_quantized(model, src, out[fmt])
    return out


def _run(model, ids, mask):
    with torch.no_grad():
        out = generate(model, ids, NEW, temperature=0, attention_mask=mask)
        full = torch.cat([mask, mask.new_ones(mask.shape[0], NEW)], 1)
        return out, model(out, attention_mask=full).logits


@pytest.fixture(scope="module")
def reference(qruns):
    ids, mask = prompts()
    return {fmt: _run(run.load_model(), ids, mask) for fmt, run in qruns.items()}


def _offloaded(path, budget, **kw):
    ids, mask = prompts()
    om = load_offloaded(path, budget, **kw)
    try:
        tokens, logits = _run(om.model, ids, mask)
        return tokens, logits, om.stats()
    finally:
        om.close()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("experts", [K, 5, 0, "all"], ids=["topk", "5experts", "0", "all"])
@pytest.mark.parametrize("policy,prefetch", [("lru", True), ("lfu", True), ("lru", False), ("lfu", False)])
def test_offloaded_quantized_equals_resident(qruns, reference, fmt, experts, policy, prefetch):
    budget = experts * STORED[fmt] if isinstance(experts, int) else experts
    tokens, logits, st = _offloaded(qruns[fmt].path, budget, policy=policy, prefetch=prefetch)
    ref_tokens, ref_logits = reference[fmt]
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(logits, ref_logits)
    assert st["expert_bytes"] == STORED[fmt]
    if isinstance(experts, int):
        assert st["capacity_experts"] == max(experts, K)
        assert st["misses"] > st["accesses"] // 2  # tiny budgets really evict
    if not prefetch:
        assert st["prefetched"] == 0
        assert st["bytes_read"] == st["misses"] * STORED[fmt]  # every miss reads the stored bytes, once


def test_quantized_runs_differ_from_fp32(checkpoints, qruns):
    """The reference really is quantized (so equality to it tests the quantized path): on the same prompts
    its logits are near the fp32 model's but not equal, int4 farther than int8 (a random model with
    std 0.2: int4 flips some routing choices, hence the loose bound)."""
    ids, mask = prompts()
    with torch.no_grad():
        fp32 = RunDir(checkpoints["moekit"]).load_model()(ids, attention_mask=mask).logits
        err = {fmt: float((run.load_model()(ids, attention_mask=mask).logits - fp32).abs().max())
               for fmt, run in qruns.items()}
    assert 0 < err["int8"] < err["int4"] < 0.25 * float(fp32.abs().max()), err


def test_budget_holds_more_quantized_experts(checkpoints, qruns):
    """One byte budget: capacity = budget // stored expert bytes, ~4x / ~7x the fp32 one here."""
    budget = 6 * EXPERT_BYTES
    caps = {"fp32": _offloaded(checkpoints["moekit"], budget)[2]["capacity_experts"]}
    for fmt, run in qruns.items():
        caps[fmt] = _offloaded(run.path, budget)[2]["capacity_experts"]
    assert caps == {"fp32": 6, "int8": min(budget // STORED["int8"], E * LAYERS),
                    "int4": min(budget // STORED["int4"], E * LAYERS)}
    assert caps["int8"] >= 3.5 * caps["fp32"] and caps["int4"] > caps["int8"]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_slots_hold_the_stored_bytes(qruns, fmt):
    """A slot is the stored parts as in the file (plus alignment), so the cache stays inside its budget."""
    budget = 4 * STORED[fmt] + 1000
    om = load_offloaded(qruns[fmt].path, budget, prefetch=False)
    try:
        _run(om.model, *prompts())
        views = om.cache._views[0]
        want = {"int8": {"w_up_q": (torch.int8, (H, D)), "w_up_scale": (torch.uint8, (H,)), "w_up_base": (torch.float32, ())},
                "int4": {"w_up_q": (torch.uint8, (H, D // 2)), "w_up_scale": (torch.float16, (H, D // GROUP))}}[fmt]
        assert {k: (v.dtype, tuple(v.shape)) for k, v in views.items() if k.startswith("w_up")} == want
        parts = len(views)
        assert STORED[fmt] <= om.cache.slot_bytes <= STORED[fmt] + 128 * parts  # rounding + room to align
        st = om.stats()
        assert st["slots_allocated"] <= st["capacity_experts"] == 4
        assert st["capacity_experts"] * om.cache.slot_bytes <= budget + 128 * parts * 4
    finally:
        om.close()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_mmap_read_and_bf16_compute(qruns, fmt):
    """The mmap read path gives the same bits; bf16 activations (int8: aten's int8 weight-only matmul)
    equal the resident model loaded in bf16."""
    ids, mask = prompts()
    tokens, logits, _ = _offloaded(qruns[fmt].path, K * STORED[fmt], read="mmap")
    ref_tokens, ref_logits = _run(qruns[fmt].load_model(), ids, mask)
    assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)
    ref = _run(qruns[fmt].load_model(torch.bfloat16), ids, mask)
    got = _offloaded(qruns[fmt].path, 3 * STORED[fmt], dtype="bfloat16")
    assert got[1].dtype == torch.bfloat16
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_truncated_quantized_file_fails_at_load(qruns, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(qruns["int8"].path, bad)
    f = RunDir(bad).model_path
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(StoreError, match=r"truncated.*layers\.\d\.ffn\.experts\.w_\w+_(q|scale|base)"):
        load_offloaded(bad, "all")


def test_one_expert_decodes_to_the_bits_of_all():
    """Scales decoded one expert at a time (the cache) equal the whole tensor's decode, at a shape where
    aten's exp2 mixes its vector and scalar paths; and within 1 ulp of base * 2^(-code/32)."""
    g = torch.Generator().manual_seed(0)
    code = torch.randint(0, 256, (5, 37), generator=g, dtype=torch.uint8)
    base = torch.rand(5, generator=g) + 0.5
    full = decode_int8_scale(code, base)
    rows = torch.cat([decode_int8_scale(code[e:e + 1], base[e:e + 1]) for e in range(5)])
    assert torch.equal(full, rows)
    exact = base.double()[:, None] * 2.0 ** (-code.double() / 32)
    torch.testing.assert_close(full.double(), exact, rtol=2 ** -22, atol=0)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_expert_linear_equals_dequantized_matmul(fmt):
    """The per-expert kernel (reusable buffer or not) against the plain dequantize of functional/quant.py."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 48, 64, generator=g)
    qt = quantize(w, fmt, GROUP if fmt == "int4" else None)
    x = torch.randn(5, 64, generator=g)
    s = expert_scales(fmt, qt.scale, qt.base, torch.float32)
    buf = torch.empty(48 * 64 + 7)
    for e in range(3):
        ref = F.linear(x, dequantize(qt, torch.float32, e))
        got = expert_linear(x, qt.q[e], s[e], fmt, qt.group, buf)
        assert torch.equal(got, expert_linear(x, qt.q[e], s[e], fmt, qt.group))
        if fmt == "int4":  # dequantize, then the same matmul
            assert torch.equal(got, ref)
        else:  # the scale after the matmul: a rounding apart
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("memory", [None, str(3 * STORED["int8"])], ids=["resident", "offloaded"])
def test_bench_generate_reports_quantized_expert_bytes(qruns, tmp_path, memory):
    from moekit.cli.bench import main

    out = tmp_path / "b.json"
    args = ["generate", str(qruns["int8"].path), "--prompt-len", "6", "--new-tokens", "4", "--threads", "1",
            "--json", str(out)] + (["--expert-memory", memory] if memory else [])
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert r["expert_bytes"] == STORED["int8"] and r["expert_format"] == "int8"
    assert r["tokens_per_s"] > 0 and 0 <= r["expert_hit_rate"] <= 1


def test_bench_formats_one_budget(checkpoints, tmp_path):
    """fp32 and int8 at one budget: int8 holds ~4x the experts, hits more, and is close to fp32."""
    from moekit.bench.formats import bench_formats, table

    rows = bench_formats(str(checkpoints["moekit"]), str(4 * EXPERT_BYTES), ["fp32", "int8"], prompt_len=6,
                         new_tokens=6, prompts=(2, 8), threads=1, work=str(tmp_path / "w"))
    fp32, int8 = rows
    assert (fp32["format"], fp32["expert_format"], int8["expert_format"]) == ("fp32", "fp32", "int8")
    assert fp32["cache_capacity_experts"] == 4 and int8["cache_capacity_experts"] == 4 * EXPERT_BYTES // STORED["int8"]
    assert int8["expert_hit_rate"] >= fp32["expert_hit_rate"]
    assert fp32["kl_mean"] == 0 and fp32["top1_agreement"] == 1
    assert 0 < int8["kl_mean"] < 0.05 and int8["top1_agreement"] > 0.8
    assert "| int8 |" in table(rows)
