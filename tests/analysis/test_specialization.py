"""Specialization: the pure per-layer profile on hand-built routes, and `moekit inspect` on a tiny run.

Legend: N tokens, A assignments.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from moekit.analysis.specialization import (
    consecutive_same_rate,
    held_out_documents,
    inspect_run,
    layer_specialization,
    load_run_model,
    sample_windows,
    show_token,
)
from moekit.cli.inspect import main as inspect_main
from moekit.data import CODE_KINDS, load_tokenizer


def test_consecutive_rate_ignores_pairs_across_windows():
    top1_N = np.array([0, 0, 1, 1, 1, 0])
    segment_N = np.array([0, 0, 0, 1, 1, 1])
    rate, chance = consecutive_same_rate(top1_N, segment_N, num_experts=2)
    # pairs within segments: (0,0) (0,1) | (1,1) (1,0) -> 2 of 4 keep the expert; the 1|1 across is skipped
    assert rate == 0.5
    assert chance == pytest.approx(0.5 ** 2 + 0.5 ** 2)


def test_layer_profile_on_hand_built_routes():
    # tokens: 7 = "def" (code), 9 = " " (whitespace); expert 0 takes all code, expert 1 all whitespace
    ids_N = np.array([7, 9, 7, 9, 7, 9])
    kinds = list(CODE_KINDS)
    kind_N = np.array([kinds.index("code"), kinds.index("whitespace")] * 3)
    experts_N = np.array([0, 1, 0, 1, 0, 1])
    ls = layer_specialization(
        layer=2, ids_N=ids_N, kind_N=kind_N, kinds=kinds, token_A=np.arange(6), expert_A=experts_N,
        top1_N=experts_N, segment_N=np.zeros(6, dtype=int), num_experts=3,
        decode_one={7: "def", 9: " "}.__getitem__, top=3)
    e0, e1, e2 = ls.experts
    assert (e0.load, e1.load, e2.load) == (0.5, 0.5, 0.0)
    assert e0.kind_share["code"] == 1.0 and e0.kind_share["whitespace"] == 0.0
    assert e1.kind_mix == {"code": 0.0, "comment/docstring": 0.0, "string": 0.0, "whitespace": 1.0}
    assert e0.top_tokens == [{"token": "def", "id": 7, "count": 3, "token_share": 1.0}]
    assert e2.top_tokens == [] and e2.kind_mix["code"] == 0.0
    assert ls.same_expert_rate == 0.0  # the experts alternate with the tokens
    assert ls.assignments == 6


def test_top_k_assignments_count_per_expert():
    # top-2: every token goes to two experts; loads are shares of the 2N assignments
    ids_N = np.array([1, 2])
    ls = layer_specialization(0, ids_N, None, [], token_A=np.array([0, 0, 1, 1]), expert_A=np.array([0, 1, 0, 2]),
                              top1_N=np.array([0, 0]), segment_N=np.zeros(2, dtype=int), num_experts=3,
                              decode_one=str, top=5)
    assert [e.load for e in ls.experts] == [0.5, 0.25, 0.25]
    assert ls.experts[0].kind_share == {} and ls.same_expert_rate == 1.0


def test_show_token_makes_whitespace_visible():
    assert show_token(" x\n\t") == "\u2423x\u21b5\u21e5"


def test_held_out_text_from_val_bin_equals_the_reread_corpus(moe_run, tmp_path: Path):
    run_dir, _ = moe_run
    tok = load_tokenizer(run_dir)
    docs, source, is_python = held_out_documents(run_dir, tok)
    assert "val.bin" in source and is_python and len(docs) >= 2
    # a copy of the run with no data folder next to it re-reads the corpus named in train_config.json
    lone = tmp_path / "lone" / "run"
    shutil.copytree(run_dir, lone)
    docs2, source2, _ = held_out_documents(lone, tok)
    assert "validation split" in source2 and docs2 == docs


def test_sample_windows_spreads_and_respects_the_budget(moe_run):
    run_dir, _ = moe_run
    tok = load_tokenizer(run_dir)
    docs, _, _ = held_out_documents(run_dir, tok)
    windows = sample_windows(docs, tok, max_tokens=300, window=64, code_kinds=True)
    assert sum(len(w.ids_T) for w in windows) == 300 and all(len(w.ids_T) <= 64 for w in windows)
    assert all(len(w.kinds_T) == len(w.ids_T) and set(w.kinds_T) <= set(CODE_KINDS) for w in windows)


def test_inspect_tiny_run(moe_run):
    run_dir, _ = moe_run
    spec = inspect_run(run_dir, max_tokens=512, window=64, top=5)
    assert spec.tokens == 512 and spec.kinds == list(CODE_KINDS)
    assert [ls.layer for ls in spec.layers] == [0, 1]  # both layers of the tiny model are MoE
    assert sum(spec.kind_totals.values()) == pytest.approx(1.0)
    for ls in spec.layers:
        assert ls.assignments == 512 * 2  # top-2
        assert sum(e.load for e in ls.experts) == pytest.approx(1.0)
        for kind in spec.kinds:  # every token of a kind goes somewhere
            if spec.kind_totals[kind] > 0:
                assert sum(e.kind_share[kind] for e in ls.experts) == pytest.approx(1.0)
        assert 0.0 <= ls.same_expert_rate <= 1.0 and 0.0 < ls.chance_rate <= 1.0
        assert all(len(e.top_tokens) <= 5 for e in ls.experts)
    # the loader is a plain function: the same model routes the same way
    model = load_run_model(run_dir)
    routes = model.route(np.array([[1, 2, 3, 4]]))
    assert sorted(routes) == [0, 1] and routes[0].top1_N.shape == (4,)


def test_inspect_cli_text_and_json(moe_run, capsys):
    run_dir, _ = moe_run
    assert inspect_main([str(run_dir), "--tokens", "256", "--window", "64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tokens"] == 256 and len(data["layers"]) == 2
    assert set(data["layers"][0]["experts"][0]["kind_share"]) == set(CODE_KINDS)
    assert inspect_main([str(run_dir), "--tokens", "256", "--window", "64"]) == 0
    out = capsys.readouterr().out
    assert "layer 0: consecutive tokens keep the same top-1 expert" in out and "chance" in out
    assert inspect_main([str(run_dir / "nope")]) == 2


def test_inspect_dense_run_has_no_moe_layers(dense_run):
    run_dir, _ = dense_run
    spec = inspect_run(run_dir, max_tokens=128, window=64)
    assert spec.layers == [] and spec.tokens == 128
