"""FSDP2 + EP on 4 gloo ranks against one process on the same global batch; DCP resharding; layouts."""
from __future__ import annotations

import math

import _fsdp_workers
import _spawn
import pytest
import torch
from _fsdp_workers import STEPS, fsdp_configs

from moekit.config import ParallelConfig
from moekit.nn.transformer import MoETransformer
from moekit.parallel import apply_fsdp, export_dcp_to_safetensors, load_dcp
from moekit.rundir import load_weights
from moekit.train.loop import build_optimizer, train


@pytest.fixture(scope="module")
def fsdp4(tiny_data, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("fsdp")
    res = _spawn.run(_fsdp_workers.fsdp_world4, 4, tiny_data, str(base), timeout=300)
    return {"ranks": [r["value"] for r in res], "base": base}


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """One process, the whole global batch, no accumulation: (metrics, final model)."""
    import json

    mcfg, tcfg = fsdp_configs()
    out = tmp_path_factory.mktemp("ref")
    train(mcfg, tcfg, out, tiny_data, label="ref")
    model = MoETransformer(mcfg)
    load_weights(model, out / "model.safetensors")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], model


def _same_losses(got: list[dict], ref: list[dict], rel: float = 1e-5) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for a, b in zip(got, ref):
        assert math.isclose(a["loss"], b["loss"], rel_tol=rel), (a["step"], a["loss"], b["loss"])
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=10 * rel), (a["step"], a["grad_norm"])
        assert a["tokens_per_expert"] == b["tokens_per_expert"]
    assert math.isclose(got[-1]["val_loss"], ref[-1]["val_loss"], rel_tol=rel)


def test_fsdp_ep2_dp2_with_accumulation_and_checkpointing_matches_one_process(fsdp4, reference) -> None:
    ref, ref_model = reference
    _same_losses(fsdp4["ranks"][0]["accum"], ref)
    for rank in (1, 2, 3):  # every rank logs the global loss
        assert [r["loss"] for r in fsdp4["ranks"][rank]["accum"]] == [r["loss"] for r in fsdp4["ranks"][0]["accum"]]
    # the documented fallback (replicated parameters, flattened all-reduce) trains the same
    _same_losses(fsdp4["ranks"][0]["fallback"], ref)
    model = MoETransformer(ref_model.config)
    load_dcp(fsdp4["base"] / "accum" / "dcp", model)
    for (k, v), w in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert float((v - w).abs().max()) < 5e-5, k


def test_mixed_precision_policy_trains_close_to_fp32(fsdp4, reference) -> None:
    ref, _ = reference
    got = fsdp4["ranks"][0]["mixed"]
    assert all(math.isclose(a["loss"], b["loss"], rel_tol=2e-2) for a, b in zip(got, ref))
    # bfloat16 compute is not fp32 compute: the policy took effect
    assert any(a["loss"] != b["loss"] for a, b in zip(got, ref))
    model = MoETransformer(fsdp_configs()[0])
    load_dcp(fsdp4["base"] / "mixed" / "dcp", model)
    assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())


def test_parameter_and_optimizer_bytes_are_a_quarter(fsdp4) -> None:
    full = sum(p.numel() * 4 for p in MoETransformer(fsdp_configs()[0]).parameters())
    fsdp = [r["bytes"]["fsdp"] for r in fsdp4["ranks"]]
    rep = [r["bytes"]["replicated"] for r in fsdp4["ranks"]]
    assert sum(b["param_bytes"] for b in fsdp) == full  # every element on exactly one rank
    assert max(b["param_bytes"] for b in fsdp) <= 1.05 * full / 4
    assert all(b["param_bytes"] > full / 2 for b in rep)  # replicated: all but half the experts
    # AdamW keeps two moments per element (+ a step counter per tensor)
    assert all(2 * b["param_bytes"] <= b["optim_bytes"] < 2 * b["param_bytes"] + 4096 for b in fsdp + rep)


def test_checkpoint_of_2x2_resumes_at_4x1_1x4_and_one_process(fsdp4, reference) -> None:
    mcfg, tcfg = fsdp_configs()
    one = MoETransformer(mcfg)
    opt = build_optimizer(one, tcfg)
    load_dcp(fsdp4["base"] / "accum" / "dcp", one, opt)
    want = dict(one.state_dict())
    for p, name in zip((p for g in opt.param_groups for p in g["params"]),
                       (n for g in opt.param_groups for n in _names(one, g["params"]))):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            want[f"{name}.{k}"] = opt.state[p][k]
    assert float(want["layers.0.ffn.experts.w_up.exp_avg_sq"].abs().sum()) > 0  # moments were saved
    exported = MoETransformer(mcfg)  # and the single safetensors file holds the same model
    load_weights(exported, export_dcp_to_safetensors(fsdp4["base"] / "accum" / "dcp", fsdp4["base"] / "m.safetensors"))
    assert all(torch.equal(v, want[k]) for k, v in exported.state_dict().items())
    for layout, ep in (("ep4dp1", 4), ("ep1dp4", 1)):
        L = mcfg.moe.num_experts // ep
        for r in fsdp4["ranks"]:
            got = r["load"][layout]
            assert got["step"] == STEPS
            e = got["ep_rank"]
            for k, v in got["tensors"].items():
                w = want[k][e * L:(e + 1) * L] if ".experts.w_" in k and want[k].dim() > 0 else want[k]
                assert torch.equal(v, w), (layout, k)


def _names(model, params) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in params]


def test_impossible_layouts_are_named_errors(fsdp4, capsys) -> None:
    assert "ep=3 must be an integer >= 1 dividing the world size 4" in fsdp4["ranks"][0]["ep3"]
    with pytest.raises(ValueError, match=r"nnodes=2 needs rdzv_endpoint=HOST:PORT"):
        ParallelConfig(nnodes=2, nproc=1)
    with pytest.raises(ValueError, match=r"ep=4 must divide the world size nproc x nnodes = 3 x 1 = 3"):
        ParallelConfig(ep=4, nproc=3)
    with pytest.raises(ValueError, match=r"rdzv_endpoint='nohost' must be HOST:PORT"):
        ParallelConfig(nproc=1, rdzv_endpoint="nohost")
    # FSDP2 shards dim 0: a 0-d parameter (the soft router's scale) is named, with the fallback to use
    mcfg = fsdp_configs()[0]
    soft = MoETransformer(mcfg.replace(moe=mcfg.moe.replace(router="soft")))
    with pytest.raises(ValueError, match=r"0-d parameters \(layers.0.ffn.router.soft_scale.*--no-fsdp"):
        apply_fsdp(soft, None)  # refused before any collective
    from moekit.cli.train import main

    assert main(["--nproc", "1", "--nnodes", "2", "--out", "unused"]) == 2
    assert "--rdzv-endpoint" in capsys.readouterr().err
