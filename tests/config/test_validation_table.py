"""Every range a config field has, one row each: the error names the field, the value and what is allowed.
And the same checks reached from the command line: one line, exit code 2, no traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from moekit.config import ModelConfig, MoEConfig, ParallelConfig, TrainConfig

MOE = dict(d_model=16, d_hidden=32)


def _model(**kw):
    return ModelConfig(**dict(vocab_size=64, d_model=16, n_layers=2, n_heads=2, moe=MoEConfig(**MOE)) | kw)


ROWS = [
    # (build, error fragment)
    (lambda: MoEConfig(**MOE, num_experts=0), "num_experts=0 must be an integer >= 1"),
    (lambda: MoEConfig(**MOE, top_k=9), "top_k=9 must be in [1, num_experts=8]"),
    (lambda: MoEConfig(**MOE, router="top2"), "router='top2' is unknown; choose one of"),
    (lambda: MoEConfig(**MOE, router="switch", top_k=2), "top_k=2 must be 1"),
    (lambda: MoEConfig(**MOE, capacity_factor=0.0), "capacity_factor=0.0 must be > 0"),
    (lambda: MoEConfig(**MOE, aux_loss_coef=-1.0), "aux_loss_coef=-1.0 must be >= 0"),
    (lambda: MoEConfig(**MOE, z_loss_coef=-1.0), "z_loss_coef=-1.0 must be >= 0"),
    (lambda: MoEConfig(**MOE, router_jitter=1.0), "router_jitter=1.0 must be in [0, 1)"),
    (lambda: MoEConfig(**MOE, routed_scaling_factor=0.0), "routed_scaling_factor=0.0 must be > 0"),
    (lambda: MoEConfig(**MOE, n_group=3), "n_group=3 must divide num_experts=8"),
    (lambda: MoEConfig(**MOE, n_group=2, topk_group=3), "topk_group=3 must be in [1, n_group=2]"),
    (lambda: MoEConfig(**MOE, num_shared_experts=-1), "num_shared_experts=-1 must be >= 0"),
    (lambda: MoEConfig(**MOE, activation="tanh"), "activation='tanh' is unknown"),
    (lambda: _model(n_heads=3), "d_model=16 must be divisible by n_heads=3"),
    (lambda: _model(n_kv_heads=3, n_heads=2), "n_kv_heads=3 must divide n_heads=2"),
    (lambda: _model(first_dense_layers=-1), "first_dense_layers=-1 must be >= 0"),
    (lambda: _model(max_seq_len=0), "max_seq_len=0 must be an integer >= 1"),
    (lambda: ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, moe=MoEConfig(d_model=32, d_hidden=8)),
     "moe.d_model=32 must equal d_model=16"),
    (lambda: TrainConfig(steps=-1), "steps=-1 must be an integer >= 1"),
    (lambda: TrainConfig(batch_size=0), "batch_size=0 must be an integer >= 1"),
    (lambda: TrainConfig(lr=0.0), "lr=0.0 must be > 0"),
    (lambda: TrainConfig(min_lr_ratio=1.5), "min_lr_ratio=1.5 must be in [0, 1]"),
    (lambda: TrainConfig(keep_checkpoints=0), "keep_checkpoints=0 must be an integer >= 1"),
    (lambda: TrainConfig(schedule_steps=0), "schedule_steps=0 must be an integer >= 1"),
    (lambda: TrainConfig(grad_clip=-1.0), "grad_clip must be >= 0"),
    (lambda: ParallelConfig(ep=0), "ep=0 must be an integer >= 1"),
    (lambda: ParallelConfig(dist_timeout=0), "dist_timeout=0 must be > 0"),
    (lambda: TrainConfig.from_dict({"stepz": 3}), "TrainConfig has no field(s) ['stepz']"),
    (lambda: MoEConfig.from_dict({**MOE, "topk": 2}), "MoEConfig has no field(s) ['topk']"),
]


@pytest.mark.parametrize("build, says", ROWS, ids=[r[1][:40] for r in ROWS])
def test_each_range_error_names_field_value_and_range(build, says):
    with pytest.raises(ValueError) as e:
        build()
    assert says in str(e.value)


@pytest.mark.parametrize("args, says", [
    (["--router", "top2"], "argument --moe.router/--router: invalid choice: 'top2'"),
    (["--steps", "-1"], "steps=-1 must be an integer >= 1"),
    (["--top-k", "9", "--experts", "8"], "top_k=9 must be in [1, num_experts=8]"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
])
def test_bad_cli_values_are_one_line_usage_errors(tmp_path, args, says):
    res = subprocess.run([sys.executable, "-m", "moekit", "train", "--out", str(tmp_path / "r"), *args],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("moekit train: error: ")]
    assert len(errors) == 1 and says in errors[0], res.stderr
    assert not (tmp_path / "r").exists()


def test_unknown_command_is_usage(tmp_path):
    res = subprocess.run([sys.executable, "-m", "moekit", "trian"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.startswith("moekit: unknown command 'trian'")
