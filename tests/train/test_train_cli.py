"""The training CLI: every --data form, --config precedence, --compare (one and several seeds), and a loss
that goes down when a tiny model overfits."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from moekit.cli.train import main
from moekit.config import ModelConfig, TrainConfig
from moekit.nn.transformer import MoETransformer
from moekit.train.loop import build_optimizer


def _write_data(kind: str, root, text_of):
    if kind == "text file":
        path = root / "code.txt"
        path.write_text(text_of(150, 0))
    elif kind == "folder":
        path = root / "src"
        (path / "pkg").mkdir(parents=True)
        for i in range(40):  # enough documents for the hash split to give both train and val some
            (path / ("pkg" if i % 2 else ".") / f"mod{i}.py").write_text(text_of(6, i))
        (path / "blob.bin").write_bytes(b"\x00\x01" * 100)  # not text: skipped
    else:
        path = root / "docs.jsonl"
        path.write_text("".join(json.dumps({"text": text_of(6, i)}) + "\n" for i in range(40)))
    return path


@pytest.mark.parametrize("kind", ["text file", "folder", "jsonl"])
def test_each_data_form_trains(kind, tmp_path, flags, metrics, python_text):
    data = _write_data(kind, tmp_path, python_text)
    run_dir = tmp_path / "run"
    assert main(flags(run_dir, 2, "--eval-interval", "2", data=data)) == 0
    recs = metrics(run_dir)
    assert [r["step"] for r in recs] == [1, 2] and "val_loss" in recs[-1]
    meta = json.loads((run_dir / "data" / "meta.json").read_text())
    assert meta["info"]["source"] == str(data.resolve())
    assert meta["info"]["train_docs"] >= 1 and meta["info"]["val_docs"] >= 1
    assert (run_dir / "tokenizer.json").is_file() and (run_dir / "model.safetensors").is_file()


def test_config_file_is_overridden_by_flags(tmp_path, corpus):
    """Precedence: defaults < --config FILE < flags, for model and training fields alike."""
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps({
        "model": {"d_model": 48, "n_layers": 3, "n_heads": 2, "max_seq_len": 128,
                  "moe": {"num_experts": 6, "top_k": 2, "router": "topk", "d_hidden": 40}},
        "train": {"steps": 5, "lr": 0.002, "batch_size": 3, "seq_len": 24, "vocab_size": 300, "seed": 7,
                  "eval_interval": 2, "eval_batches": 1, "threads": 1},
    }))
    run_dir = tmp_path / "run"
    argv = ["--config", str(run_json), "--data", str(corpus), "--out", str(run_dir),
            "--d-model", "32", "--experts", "4", "--steps", "2", "--seed", "3"]
    assert main(argv) == 0
    m = ModelConfig.from_json(run_dir / "config.json")
    t = TrainConfig.from_json(run_dir / "train_config.json")
    # flags win
    assert (m.d_model, m.moe.d_model, m.moe.num_experts, t.steps, t.seed) == (32, 32, 4, 2, 3)
    # the file beats the defaults
    assert (m.n_layers, m.max_seq_len, m.moe.top_k, m.moe.router, m.moe.d_hidden) == (3, 128, 2, "topk", 40)
    assert (t.lr, t.batch_size, t.seq_len, t.eval_interval, t.eval_batches) == (0.002, 3, 24, 2, 1)
    # untouched fields keep their defaults
    assert t.weight_decay == TrainConfig().weight_decay and m.moe.aux_loss_coef == 0.01
    assert m.vocab_size == 300


@pytest.mark.parametrize("content, says", [
    ("{not json", "is not valid JSON"), ("[1, 2]", "holds a JSON list; expected an object"),
    ('{"modle": {}}', "unknown section(s) 'modle'"), (b"\xff\xfe\x00binary", "is not valid JSON")])
def test_bad_config_file_is_one_line_usage_error(tmp_path, capsys, content, says):
    bad = tmp_path / "run.json"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moekit train: error: --config {bad}") and says in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


SUMMARY_KEYS = {"final_val_loss", "tokens_per_s", "total_params", "active_params", "wall_s"}


def test_compare_writes_both_runs_and_a_summary(tmp_path, flags):
    out = tmp_path / "cmp"
    assert main([*flags(out, 3, "--eval-interval", "3"), "--compare"]) == 0
    assert (out / "moe" / "metrics.jsonl").is_file() and (out / "dense" / "metrics.jsonl").is_file()
    summary = json.loads((out / "summary.json").read_text())
    for name in ("moe", "dense"):
        assert SUMMARY_KEYS <= set(summary[name])
        assert all(summary[name][k] > 0 for k in SUMMARY_KEYS)
        assert len(summary[name]["per_seed"]) == 1
    moe_cfg = ModelConfig.from_json(out / "moe" / "config.json")
    dense_cfg = ModelConfig.from_json(out / "dense" / "config.json")
    assert not moe_cfg.dense and dense_cfg.dense
    # equal active parameters: the dense MLP is as wide as the K active experts; only the routers
    # (E x D per MoE layer) are extra
    assert summary["moe"]["active_params"] - summary["dense"]["active_params"] == 2 * 4 * 32
    assert summary["moe"]["total_params"] > summary["dense"]["total_params"]
    assert summary["moe"]["total_params"] == MoETransformer(moe_cfg).num_params()["total_params"]


def test_compare_with_two_seeds_reports_each_seed_and_the_mean(tmp_path, flags):
    out = tmp_path / "cmp"
    assert main([*flags(out, 2, "--eval-interval", "2", "--seed", "5"), "--compare", "--seeds", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [5, 6]
    for name in ("moe", "dense"):
        rows = summary[name]["per_seed"]
        assert [r["seed"] for r in rows] == [5, 6]
        assert [r["run_dir"] for r in rows] == [str(out / name / "seed5"), str(out / name / "seed6")]
        for k in ("final_val_loss", "tokens_per_s", "wall_s"):
            assert summary[name][k] == pytest.approx(statistics.fmean(r[k] for r in rows))
        assert rows[0]["final_val_loss"] != rows[1]["final_val_loss"]  # the seeds really differ
        assert all(SUMMARY_KEYS <= set(r) for r in rows)
    diffs = [m["final_val_loss"] - d["final_val_loss"]
             for m, d in zip(summary["moe"]["per_seed"], summary["dense"]["per_seed"])]
    assert summary["moe_minus_dense_val_loss"]["per_seed"] == pytest.approx(diffs)


@pytest.mark.parametrize("router", ["topk", "switch", "noisy_topk", "sigmoid_bias", "expert_choice", "dense"])
def test_loss_decreases_when_overfitting_one_batch(router):
    """A tiny model trained on one fixed batch memorises it: the loss falls far below its start."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=2, max_seq_len=32,
                      moe={"d_model": 32, "d_hidden": 32, "num_experts": 4, "router": router,
                           "top_k": 1 if router == "switch" else 2})
    model = MoETransformer(cfg).train()
    opt = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.0))
    data = torch.randint(0, 48, (4, 17), generator=torch.Generator().manual_seed(1))
    x, y = data[:, :-1], data[:, 1:]
    losses = []
    for _ in range(60):
        out = model(x, labels=y)
        opt.zero_grad()
        (out.loss + out.aux_loss).backward()
        opt.step()
        for block in model.layers:  # sigmoid_bias: the aux-loss-free balancing step, as the trainer does
            if block.is_moe and block.ffn.router.expert_bias is not None:
                block.ffn.update_expert_bias(out.stats[block.idx].tokens_per_expert)
        losses.append(float(out.loss.detach()))
    assert losses[0] > 3.5  # about ln(48) = 3.87 at the start
    assert losses[-1] < 0.25 * losses[0], losses[::10]


def test_compiled_training_follows_eager(tmp_path, flags, losses):
    """--compile trains the same model (torch.compile shares its parameters): the loss curve matches eager
    up to kernel rounding, and the checkpoint holds the plain model's weight names."""
    eager, comp = tmp_path / "eager", tmp_path / "compiled"
    assert main(flags(eager, 3, "--eval-interval", "3")) == 0
    assert main(flags(comp, 3, "--eval-interval", "3", "--compile")) == 0
    le, lc = losses(eager), losses(comp)
    assert sorted(le) == sorted(lc) == [1, 2, 3]
    for step in le:
        assert lc[step][0] == pytest.approx(le[step][0], rel=1e-4, abs=1e-5)
        assert lc[step][1] == pytest.approx(le[step][1], rel=1e-3, abs=1e-6)
    assert json.loads((comp / "train_config.json").read_text())["compile"] is True
    from safetensors import safe_open
    with safe_open(str(comp / "model.safetensors"), "pt") as f:
        assert not any("_orig_mod" in k for k in f.keys())
