"""Pruning: exact spec deltas, reload + generate + convert, the choice against brute force, bad input."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from moekit.cli.main import main as moekit_main
from moekit.compress.prune import expert_scores, kept_experts, prune_model
from moekit.functional.dispatch import expert_ffn
from moekit.rundir import RunDir
from moekit.spec.count import count_params

from .conftest import tiny_model


def _spec(run):
    return count_params(json.loads(RunDir(run).config_path.read_text()))


@pytest.mark.parametrize("method", ["frequency", "reap"])
def test_prune_reloads_generates_converts_and_spec_drops_by_the_removed_experts(moe_run, tmp_path, capsys, method):
    out = tmp_path / "p"
    assert moekit_main(["prune", str(moe_run.path), "--keep", "5", "--method", method, "--out", str(out)]) == 0
    before, after = _spec(moe_run.path), _spec(out)
    L, D, H, removed = 2, 32, 64, 3
    assert before.total_params - after.total_params == L * removed * (3 * D * H + D)  # expert slices + router rows
    assert before.components["routed_experts"].total - after.components["routed_experts"].total == L * removed * 3 * D * H
    model = RunDir(out).load_model()
    assert model.config.moe.num_experts == 5 and model.num_params()["total_params"] == after.total_params
    assert moekit_main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert moekit_main(["convert", str(out), str(tmp_path / "hf")]) == 0
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert 5 in hf.values()


def test_pruned_weights_are_the_kept_slices(moe_run):
    model = moe_run.load_model()
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(8, generator=g, dtype=torch.float64) for n, m in model.named_modules()
              if type(m).__name__ == "MoELayer"}
    pruned = prune_model(model, scores, 3)
    for (name, s), layer, new in zip(scores.items(), model.moe_layers(), pruned.moe_layers()):
        keep = kept_experts(s, 3)
        assert keep == sorted(torch.topk(s, 3).indices.tolist())
        assert torch.equal(new.router.weight, layer.router.weight[keep])
        assert torch.equal(new.experts.w_down, layer.experts.w_down[keep])


def _toy():
    """4 experts, top-2: experts' output scales differ 30x, and the router favours the small ones."""
    model = tiny_model(5, num_experts=4, top_k=2)
    with torch.no_grad():
        for layer in model.moe_layers():
            scale = torch.tensor([0.05, 1.5, 0.05, 1.0])
            layer.experts.w_down.mul_(scale[:, None, None])
            layer.router.weight.add_(torch.tensor([0.3, 0.0, 0.3, -0.1])[:, None] * layer.router.weight.abs().mean())
    return model


@torch.no_grad()
def _brute_force(model, ids, keep, method):
    """Per layer, by a naive per-token loop over the unpruned model's routing: the subset of `keep` experts
    keeping most assignments (frequency), or losing the least router-weighted output norm (REAP: removed
    experts' mean gate * ||expert output|| summed)."""
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(model.moe_layers())]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    best = []
    for i, layer in enumerate(model.moe_layers()):
        x = inputs[i]
        probs = (x @ layer.router.weight.t()).softmax(-1)
        top_w, top_i = probs.topk(2, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        count, mass = torch.zeros(4), torch.zeros(4)
        for t in range(x.shape[0]):
            for w, e in zip(top_w[t], top_i[t]):
                ex = layer.experts
                y = expert_ffn(x[t:t + 1], ex.w_gate[e], ex.w_up[e], ex.w_down[e], "swiglu")
                count[e] += 1
                mass[e] += w * y.norm()
        score = count if method == "frequency" else mass / count.clamp_min(1)
        subsets = list(itertools.combinations(range(4), keep))
        best.append(list(max(subsets, key=lambda s: float(sum(score[list(s)])))))
    return best


@pytest.mark.parametrize("method", ["frequency", "reap"])
def test_pruning_choice_equals_brute_force_over_subsets(method):
    model = _toy()
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    scores = expert_scores(model, [ids], method)
    chosen = [kept_experts(s, 2) for s in scores.values()]
    assert chosen == _brute_force(model, ids, 2, method)
    if method == "reap":  # the large-output experts survive although routed less often
        assert all(c == [1, 3] for c in chosen)


def test_keep_below_top_k_clamps_with_a_warning(moe_run, tmp_path, capsys):
    out = tmp_path / "p"
    assert moekit_main(["prune", str(moe_run.path), "--keep", "1", "--method", "frequency", "--out", str(out)]) == 0
    assert "top_k=2 > --keep 1: top_k clamped to 1" in capsys.readouterr().err
    assert RunDir(out).config().moe.top_k == 1


@pytest.mark.parametrize("keep,msg", [("8", "--keep 8 must be in [1, 7]"), ("0", "--keep 0 must be in [1, 7]")])
def test_bad_keep_is_one_line_and_exit_2(moe_run, tmp_path, capsys, keep, msg):
    assert moekit_main(["prune", str(moe_run.path), "--keep", keep, "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_prune_refuses_a_dense_run_and_a_missing_run(dense_run, tmp_path, capsys):
    assert moekit_main(["prune", str(dense_run.path), "--keep", "2", "--out", str(tmp_path / "p")]) == 2
    assert "no MoE layer to prune" in capsys.readouterr().err
    assert moekit_main(["prune", str(tmp_path / "nope"), "--keep", "2", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "not a moekit run directory" in err and len(err.strip().splitlines()) == 1


def test_prune_with_a_calibration_text_file(moe_run, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("def g(items):\n    return sorted(items)\n" * 80)
    out = tmp_path / "p"
    assert moekit_main(["prune", str(moe_run.path), "--keep", "4", "--method", "reap", "--calib", str(calib),
                        "--out", str(out)]) == 0
    assert RunDir(out).config().moe.num_experts == 4
    assert moekit_main(["prune", str(moe_run.path), "--keep", "4", "--calib", str(tmp_path / "missing.txt"),
                        "--out", str(tmp_path / "p2")]) == 2
    err = capsys.readouterr().err
    assert "missing.txt" in err and len(err.strip().splitlines()) == 1
