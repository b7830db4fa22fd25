"""Quantization: formats against independent llama.cpp-style references, save/load, coverage, spec, CLI."""
from __future__ import annotations

import pytest
import torch

from moekit.cli.main import main as moekit_main
from moekit.compress.calib import calibration_batches
from moekit.compress.quantize import QuantSpec, collect_hessians, coverage, quantize_model
from moekit.functional.quant import bits_per_weight, dequantize, pack_int4, quantize, unpack_int4
from moekit.nn.experts import GroupedExperts
from moekit.nn.quantized import QuantizedGroupedExperts
from moekit.rundir import RunDir
from moekit.spec.quant import quant_summary

from ._reference import q4_0, q8_0

IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def _weight(seed=0, shape=(4, 64, 128)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[0, 0, 0] = 0.9  # an outlier
    w[1, 3] = 0.0  # an all-zero row
    return w


def test_int4_packing_round_trips_every_nibble():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2, 2)  # (3, 2, 32)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (3, 2, 16)
    assert torch.equal(unpack_int4(p), q)
    assert int(p[0, 0, 0]) & 15 == 0 and int(p[0, 0, 0]) >> 4 == 1


def test_int8_error_bounds_and_against_q8_0():
    w = _weight()
    qt = quantize(w, "int8")
    deq = dequantize(qt)
    amax = w.abs().amax(-1, keepdim=True)
    # never clipped: |error| <= half a step, and the step is at most 2^(1/32) x amax / 127
    step = (qt.base[:, None] * 2.0 ** (-qt.scale.float() / 32))[..., None]  # the documented decoding
    assert (step >= amax / 127 * (1 - 1e-6)).all()
    assert ((deq - w).abs() <= step / 2 * (1 + 1e-5) + 1e-12).all()
    assert ((deq - w).abs() <= amax / 127 * 2 ** (1 / 32) / 2 + 1e-9).all()
    assert torch.equal(deq[1, 3], torch.zeros(128))
    # Q8_0 (blocks of 32, fp16 scale) can only be finer than one scale per row: bounded ratio of errors
    mse, mse_ref = ((deq - w) ** 2).mean(), ((q8_0(w) - w) ** 2).mean()
    assert mse_ref <= mse <= 3.0 * mse_ref


@pytest.mark.parametrize("group", [32, 64])
def test_int4_is_no_worse_than_q4_0_per_weight(group):
    w = _weight(1)
    qt = quantize(w, "int4", group)
    deq = dequantize(qt)
    err = ((deq - w) ** 2).reshape(4, 64, -1, group).sum(-1)
    if group == 32:  # same blocks and scale rule as Q4_0: no block's error above Q4_0's (ties may round apart)
        ref = ((q4_0(w) - w) ** 2).reshape(4, 64, -1, 32).sum(-1)
        assert (err <= ref * (1 + 1e-4) + 1e-10).all()
        # the largest-magnitude value of every group is represented exactly (-8 x scale)
        blocks = w.reshape(4, 64, -1, 32)
        i = blocks.abs().argmax(-1, keepdim=True)
        torch.testing.assert_close(deq.reshape(4, 64, -1, 32).gather(-1, i), blocks.gather(-1, i), atol=1e-3, rtol=1e-3)
    s = qt.scale.float().repeat_interleave(group, -1)
    assert ((deq - w).abs() <= s.abs() * 8.0 + 1e-9).all()  # bounded by the group's range
    assert qt.q.dtype == torch.uint8 and qt.q.shape == (4, 64, 64) and qt.scale.dtype == torch.float16


def test_bits_per_weight_formulas():
    assert bits_per_weight("int4", 128, 32) == 4.5
    assert bits_per_weight("int4", 128, 64) == 4.25
    assert bits_per_weight("int8", 128) == 8.0625


def test_quantized_experts_match_dequantized_reference(moe_run):
    model = moe_run.load_model()
    layer = model.moe_layers()[0]
    q = QuantizedGroupedExperts.from_experts(layer.experts, "int4", 32)
    ref = GroupedExperts(8, 32, 64)
    with torch.no_grad():
        for n in ("w_gate", "w_up", "w_down"):
            getattr(ref, n).copy_(q.dequantized(n))
    x = torch.randn(10, 32)
    tok = torch.arange(10).repeat_interleave(2)
    exp = torch.randint(0, 9, (20,), generator=torch.Generator().manual_seed(3))  # 8 = dropped
    wt = torch.rand(20)
    torch.testing.assert_close(q(x, tok, exp, wt), ref(x, tok, exp, wt), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fmt,group,include", [("int8", None, ()), ("int4", 32, ()), ("int4", 32, ("shared", "attention"))])
def test_quantize_save_load_gives_the_same_logits(shared_run, tmp_path, fmt, group, include):
    out = tmp_path / "q"
    args = [str(shared_run.path), "--format", fmt, "--out", str(out), "--calib-tokens", "1024"]
    args += ["--group", str(group)] if group else []
    args += ["--include", ",".join(include)] if include else []
    assert moekit_main(["quantize", *args]) == 0
    # the same quantization in memory
    model = shared_run.load_model()
    spec = QuantSpec(fmt, group, include)
    h, _ = collect_hessians(model, calibration_batches(shared_run, None, "train", max_tokens=1024), include)
    quantize_model(model, spec, h)
    loaded = RunDir(out).load_model()
    assert isinstance(loaded.moe_layers()[0].experts, QuantizedGroupedExperts)
    assert not any(p.is_meta for p in loaded.parameters()) and not any(b.is_meta for b in loaded.buffers())
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    # 100% of the routed-expert weights, shared / attention only when included
    cov = coverage(loaded)
    assert cov["routed_experts"]["quantized"] == cov["routed_experts"]["total"] == 2 * 8 * 3 * 32 * 64
    for part in ("shared", "attention"):
        c = cov[f"{part}_experts" if part == "shared" else part]
        assert c["total"] > 0 and c["quantized"] == (c["total"] if part in include else 0)
    assert cov["other"]["quantized"] == 0


@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 32)])
def test_spec_reports_the_stored_bytes_exactly(moe_run, tmp_path, capsys, fmt, group):
    out = tmp_path / "q"
    args = ["quantize", str(moe_run.path), "--format", fmt, "--out", str(out), "--method", "rtn"]
    assert moekit_main(args + (["--group", str(group)] if group else [])) == 0
    s = quant_summary(out)
    L, E, D, H = 2, 8, 32, 64
    per_proj = {"gate": (H, D), "up": (H, D), "down": (D, H)}
    if fmt == "int8":  # q (1 byte) + code per row (1 byte) + fp32 base per expert
        expected = L * sum(E * (o * i + o + 4) for o, i in per_proj.values())
    else:  # q (half a byte) + fp16 scale per group
        expected = L * sum(E * (o * i // 2 + 2 * o * i // group) for o, i in per_proj.values())
    assert s["routed_experts"]["bytes"] == expected
    assert s["routed_experts"]["weights"] == L * E * 3 * D * H
    bits = s["routed_experts"]["bits_per_weight"]
    assert bits == pytest.approx(8 * expected / (L * E * 3 * D * H))
    if fmt == "int4":
        assert bits == 4 + 16 / group
    else:  # 8 bits + an 8-bit code per row of I inputs (I = 32 or 64 here; 8.05 at the default LM's 128 / 256)
        assert bits == pytest.approx(8 + 8 * (2 * H + D + 3 * 4) / (3 * D * H))
    plain = quant_summary(moe_run)["routed_experts"]["bytes"]
    assert plain == 4 * L * E * 3 * D * H  # fp32 source
    assert moekit_main(["spec", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "as stored" in printed and f"{bits:.3f}" in printed


def test_quantized_model_generates(moe_run, tmp_path, capsys):
    out = tmp_path / "q"
    assert moekit_main(["quantize", str(moe_run.path), "--format", "int4", "--out", str(out), "--method", "rtn"]) == 0
    assert moekit_main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", "5", "--temperature", "0"]) == 0


@pytest.mark.parametrize("args,code,msg", [
    (["--format", "int4", "--group", "128"], 2, "does not divide the input dim 32"),
    (["--format", "int8", "--group", "32"], 2, "--group applies to --format int4 only"),
    (["--format", "int8", "--include", "lm_head"], 2, "include=['lm_head'] is unknown"),
])
def test_bad_quantize_input_is_one_line_and_exit_2(moe_run, tmp_path, capsys, args, code, msg):
    assert moekit_main(["quantize", str(moe_run.path), *args, "--out", str(tmp_path / "q"), "--method", "rtn"]) == code
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_quantize_refuses_a_dense_run(dense_run, tmp_path, capsys):
    assert moekit_main(["quantize", str(dense_run.path), "--format", "int8", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "no MoE layer" in err and len(err.strip().splitlines()) == 1


def test_gptq_lowers_output_error_against_rounding(moe_run):
    """GPTQ minimises ||(W - Q) X|| on its calibration inputs; on those inputs it must beat rounding."""
    model = moe_run.load_model()
    h, _ = collect_hessians(model, calibration_batches(moe_run, None, "train", max_tokens=2048))
    name = next(iter(h))
    w = model.get_submodule(name).w_up.detach()
    errs = {}
    for method, hess in (("rtn", None), ("gptq", h[name]["w_up"])):
        d = dequantize(quantize(w, "int4", 32, hess)) - w
        errs[method] = float(torch.einsum("eoi,eij,eoj->", d, h[name]["w_up"], d))
    assert errs["gptq"] < errs["rtn"]


def test_quantize_refuses_a_quantized_run(moe_run, tmp_path, capsys):
    q = tmp_path / "q"
    assert moekit_main(["quantize", str(moe_run.path), "--format", "int8", "--out", str(q), "--method", "rtn"]) == 0
    assert moekit_main(["quantize", str(q), "--format", "int4", "--out", str(tmp_path / "q2")]) == 2
    assert "already quantized (int8)" in capsys.readouterr().err


def test_convert_refuses_a_quantized_run_in_one_line(moe_run, tmp_path, capsys):
    q = tmp_path / "q"
    assert moekit_main(["quantize", str(moe_run.path), "--format", "int8", "--out", str(q), "--method", "rtn"]) == 0
    assert moekit_main(["convert", str(q), str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert "is quantized (int8)" in err and len(err.strip().splitlines()) == 1


def test_bf16_int8_path_matches_dequantized_bf16(moe_run):
    """bf16 activations take aten's int8 weight-only matmul; it must agree with dequantize-then-matmul."""
    layer = moe_run.load_model().moe_layers()[0]
    q = QuantizedGroupedExperts.from_experts(layer.experts, "int8")
    x = torch.randn(6, 32).bfloat16()
    tok = torch.arange(6).repeat_interleave(2)
    exp = torch.randint(0, 8, (12,), generator=torch.Generator().manual_seed(4))
    wt = torch.rand(12).bfloat16()
    ref = GroupedExperts(8, 32, 64)
    with torch.no_grad():
        for n in ("w_gate", "w_up", "w_down"):
            getattr(ref, n).copy_(q.dequantized(n))
        expected = ref.to(torch.bfloat16)(x, tok, exp, wt).float()
        got = q(x, tok, exp, wt).float()
    torch.testing.assert_close(got, expected, atol=2e-2 * expected.abs().max().item(), rtol=0.05)
