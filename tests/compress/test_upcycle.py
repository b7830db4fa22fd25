"""Upcycling: step-0 logits equal the dense model's for every accepted router and granularity; refusals."""
from __future__ import annotations

import json

import pytest
import torch

from moekit.cli.main import main as moekit_main
from moekit.compress.upcycle import start_rule, upcycle_model
from moekit.rundir import RunDir

IDS = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(0))

# (router, norm_topk, experts, top_k, granularity)
ACCEPTED = [
    ("topk", True, 8, 2, 1), ("topk", False, 8, 2, 1), ("switch", False, 8, 1, 1), ("noisy_topk", True, 8, 2, 1),
    ("sigmoid_bias", True, 8, 2, 1), ("sigmoid_bias", False, 8, 2, 1), ("dense", True, 4, 4, 1),
    ("topk", True, 8, 2, 2), ("topk", True, 16, 4, 4), ("sigmoid_bias", True, 8, 4, 2),
    ("sigmoid_bias", False, 16, 4, 2), ("dense", True, 8, 8, 4), ("topk", True, 8, 8, 8),
]


@pytest.mark.parametrize("router,norm,E,K,G", ACCEPTED)
def test_step0_logits_equal_the_dense_model(dense_run, router, norm, E, K, G):
    dense = dense_run.load_model()
    moe = upcycle_model(dense, E, K, G, router, norm, seed=1)
    assert moe.config.moe.d_hidden == dense.config.dense_hidden // G and len(moe.moe_layers()) == 2
    with torch.no_grad():
        ref = dense(IDS).logits
        for mode in (False, True):  # eval, and training mode (noise, the training path) at step 0
            moe.train(mode)
            torch.manual_seed(0)
            assert (moe(IDS).logits - ref).abs().max() <= 1e-5, (router, norm, E, K, G, mode)
    # not a trivial equality: the layers do route (K of E experts per token), and experts are slices
    assert moe.num_params()["active_params"] < moe.num_params()["total_params"] or K == E


def test_the_granular_start_needs_whole_copies(dense_run):
    """Breaking the tie of a copy's router rows (G = 2, top-2) breaks exactness: the test above is not vacuous."""
    dense = dense_run.load_model()
    moe = upcycle_model(dense, 8, 2, 2, "topk", True, seed=1)
    with torch.no_grad():
        moe.moe_layers()[0].router.weight[1] += 0.5  # slice 1 of copy 0 no longer ties with slice 0
        assert (moe(IDS).logits - dense(IDS).logits).abs().max() > 1e-3


@pytest.mark.parametrize("router,norm,E,K,G,msg", [
    ("expert_choice", True, 8, 2, 1, "router 'expert_choice' has no exact start"),
    ("switch", False, 8, 1, 2, "has no exact start with --granularity 2"),
    ("noisy_topk", True, 8, 2, 2, "has no exact start with --granularity 2"),
    ("topk", False, 8, 2, 2, "has no exact start with --granularity 2"),
    ("topk", True, 8, 3, 2, "--top-k 3 must be a multiple of --granularity 2"),
    ("topk", True, 8, 2, 3, "--granularity 3 must divide --experts 8"),
    ("topk", True, 8, 9, 1, "--top-k 9 must be in [1, 8]"),
])
def test_routers_without_an_exact_start_are_refused(router, norm, E, K, G, msg):
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        start_rule(router, norm, E, K, G)


def test_rules_scale_by_derivation():
    assert start_rule("topk", False, 8, 2, 1).scale == 4.0  # E / K
    assert start_rule("switch", False, 8, 1, 1).scale == 8.0
    assert start_rule("topk", True, 16, 4, 4).scale == 4.0  # G
    assert start_rule("sigmoid_bias", False, 16, 4, 2).scale == 1.0  # 2G / K
    assert start_rule("topk", False, 8, 2, 1).router_init == "zero"


def test_cli_upcycles_and_train_init_from_continues(dense_run, tmp_path, capsys):
    out = tmp_path / "up"
    assert moekit_main(["upcycle", str(dense_run.path), "--experts", "8", "--top-k", "4", "--granularity", "2",
                        "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "step-0 max |logit diff|" in printed
    diff = float(printed.split("step-0 max |logit diff| ")[1].split()[0])
    assert diff <= 1e-5
    cfg = RunDir(out).config()
    assert not cfg.dense and cfg.moe.num_experts == 8 and cfg.moe.d_hidden == 64
    corpus = tmp_path / "c.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 300)
    run = tmp_path / "ft"
    assert moekit_main(["train", "--init-from", str(out), "--data", str(corpus), "--out", str(run), "--steps", "2",
                        "--batch-size", "2", "--seq-len", "32", "--eval-interval", "2", "--eval-batches", "1",
                        "--threads", "1"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps[-1] == 2
    assert RunDir(run).config().moe.num_experts == 8


@pytest.mark.parametrize("args,msg", [
    (["--experts", "8", "--top-k", "2", "--router", "expert_choice"], "router 'expert_choice' has no exact start"),
    (["--experts", "8", "--top-k", "2", "--granularity", "3"], "--granularity 3 must divide"),
])
def test_bad_upcycle_input_is_one_line_and_exit_2(dense_run, tmp_path, capsys, args, msg):
    assert moekit_main(["upcycle", str(dense_run.path), *args, "--out", str(tmp_path / "u")]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_upcycle_refuses_an_moe_run(moe_run, tmp_path, capsys):
    assert moekit_main(["upcycle", str(moe_run.path), "--experts", "8", "--top-k", "2", "--out", str(tmp_path / "u")]) == 2
    assert "upcycle needs a dense run" in capsys.readouterr().err
