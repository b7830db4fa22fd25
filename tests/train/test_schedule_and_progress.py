"""The learning-rate schedule the run logs, the weight-decay groups, and the progress line's fields."""
from __future__ import annotations

import math

import pytest

from moekit.cli.train import main
from moekit.config import ModelConfig, MoEConfig, TrainConfig
from moekit.nn.transformer import MoETransformer
from moekit.train.loop import build_optimizer
from moekit.train.progress import Progress


def _formula(step: int, lr: float, warmup: int, total: int, floor_ratio: float) -> float:
    """Written from the README: linear warmup to lr, then cosine down to lr * min_lr_ratio at the last step."""
    if step <= warmup:
        return lr * step / warmup
    t = (step - warmup) / (total - warmup)
    floor = lr * floor_ratio
    return floor + (lr - floor) * (1 + math.cos(math.pi * t)) / 2


def test_the_logged_lr_follows_warmup_then_cosine(tmp_path, flags, metrics):
    run = tmp_path / "run"
    assert main(flags(run, 12, "--lr", "0.01", "--warmup-steps", "4", "--min-lr-ratio", "0.2")) == 0
    lr = {r["step"]: r["lr"] for r in metrics(run)}
    for step in (1, 2, 4, 5, 8, 12):
        assert lr[step] == pytest.approx(_formula(step, 0.01, 4, 12, 0.2), rel=1e-12), step
    assert lr[4] == pytest.approx(0.01) and lr[12] == pytest.approx(0.002)  # peak, then the floor


def test_matrices_decay_and_vectors_do_not():
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, tie_embeddings=False,
                      moe=MoEConfig(d_model=16, d_hidden=8, num_experts=4, top_k=2))
    model = MoETransformer(cfg)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decay}
    assert "embed.weight" in names and "lm_head.weight" in names and "layers.0.ffn.experts.w_up" in names
    assert "layers.0.ffn.router.weight" in names
    no_decay = {n for n, p in model.named_parameters() if id(p) not in decay}
    assert no_decay == {n for n, p in model.named_parameters() if p.dim() < 2}
    assert "norm.weight" in no_decay and "layers.0.attn_norm.weight" in no_decay


def test_the_progress_line_shows_loss_val_speed_load_drop_and_collapse(capsys):
    rec = {"loss": 3.14159, "tokens_per_s": 12345.6, "max_over_mean_load": {"0": 1.2, "1": 2.5},
           "drop_rate": {"0": 0.0, "1": 0.031}}
    p = Progress("moe", 100, 0)
    line = p._info(rec, 2.71828, {("1", "dead", 3): {}})
    p.close()
    assert line.split(" | ") == ["loss 3.142", "val 2.718", "12,346 tok/s", "load max/mean 2.50", "drop 3.1%",
                                 "COLLAPSE: 1 warning(s)"]
    assert Progress("moe", 100, 0)._info({"loss": 1.0, "tokens_per_s": 5.0}, None, {}) == "loss 1.000 | 5 tok/s"


def test_the_plain_progress_line_has_step_and_eta(capsys):
    p = Progress("moe", 100, 0, print_every=50)
    p.update(50, {"loss": 1.0, "tokens_per_s": 10.0}, None, {})
    p.update(51, {"loss": 1.0, "tokens_per_s": 10.0}, None, {})  # not a print step
    p.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[moe] step 50/100 eta ") and err[0].endswith("| loss 1.000 | 10 tok/s")


_FULL = {"loss": 3.14159, "tokens_per_s": 12345.6, "max_over_mean_load": {"0": 1.2, "1": 2.5},
         "drop_rate": {"0": 0.0, "1": 0.031}}


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("label", ["moe", "dense seed 12"])
def test_the_live_line_keeps_step_eta_loss_and_val_at_any_width(width, label):
    from moekit.train.progress import format_eta, render_line

    p = Progress(label, 1500, 0)
    line = render_line(label, 750, 1500, format_eta(200.0), p.fields(_FULL, 2.71828, {}), width)
    p.close()
    assert len(line) <= width
    for must in (label, "750/1500", "eta 3m20s", "loss 3.142", "val 2.718"):
        assert must in line, (must, line)
    assert "…" not in line
    if width == 120:  # room for everything, and a bar half full
        assert "12,346 tok/s" in line and "load max/mean 2.50" in line and "drop 3.1%" in line
        bar = line[len(label) + 1:line.index(" 750/1500")]
        assert set(bar) == {"━", "─"} and abs(bar.count("━") - bar.count("─")) <= 1
    else:  # the lowest priorities went first: drops, then load
        assert "drop" not in line


def test_the_eta_is_the_median_step_time_so_a_stall_does_not_swing_it():
    p = Progress("moe", 100, 0)
    p.step_s.extend([0.1] * 20 + [30.0])  # one step stalled for 30 s
    assert p.eta_s(50) == pytest.approx(0.1 * 50)
    p.close()
