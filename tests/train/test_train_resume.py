"""Exact resume: 2N steps == N steps + --resume N more, bit for bit, for routers whose state matters
(noisy_topk draws from torch's global RNG; sigmoid_bias updates its expert_bias buffer every step)."""
from __future__ import annotations

import signal

import pytest
import torch
from safetensors.torch import load_file

from moekit.cli.train import main
from moekit.config import TrainConfig
from moekit.rundir import read_manifest
from moekit.train.progress import Progress

N = 10  # 2N = 20 steps, all within the default 30 warmup steps: the LR schedule does not depend on --steps


def _weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


@pytest.mark.parametrize("router", ["topk", "noisy_topk", "sigmoid_bias"])
def test_resume_is_bit_identical(router, tmp_path, flags, losses, metrics):
    full, half = tmp_path / "full", tmp_path / "half"
    assert main(flags(full, 2 * N, "--router", router)) == 0
    assert main(flags(half, N, "--router", router)) == 0
    assert read_manifest(half)["step"] == N
    assert main(["--resume", str(half), "--steps", str(2 * N)]) == 0

    expected = losses(full)
    assert sorted(expected) == list(range(1, 2 * N + 1))
    assert [r["step"] for r in metrics(half)] == list(range(1, 2 * N + 1))  # each step logged once
    assert losses(half) == expected  # loss, aux loss and val loss: exact float equality
    wa, wb = _weights(full), _weights(half)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    if router == "sigmoid_bias":  # the buffer really moved, so restoring it was tested
        assert any(k.endswith("expert_bias") and wa[k].abs().sum() > 0 for k in wa)


def test_resume_depends_on_the_saved_rng_state(tmp_path, flags, losses, monkeypatch):
    """Sensitivity check of the test above: not restoring torch's RNG changes noisy_topk's losses."""
    full, half = tmp_path / "full", tmp_path / "half"
    assert main(flags(full, 2 * N, "--router", "noisy_topk")) == 0
    assert main(flags(half, N, "--router", "noisy_topk")) == 0
    monkeypatch.setattr(torch, "set_rng_state", lambda state: None)
    assert main(["--resume", str(half), "--steps", str(2 * N)]) == 0
    a, b = losses(full), losses(half)
    assert all(a[s] == b[s] for s in range(1, N + 1))
    assert any(a[s] != b[s] for s in range(N + 1, 2 * N + 1))


def test_resume_overrides_become_the_runs_plan(tmp_path, flags, losses, monkeypatch):
    """`--resume RUN --steps 12` is interrupted (SIGTERM at step 8); a plain `--resume RUN` then continues
    that plan to step 12, exactly as the uninterrupted `--resume RUN --steps 12` does."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    for d in (ref, run):
        assert main(flags(d, 4, "--warmup-steps", "2", "--ckpt-interval", "4")) == 0
    assert main(["--resume", str(ref), "--steps", "12"]) == 0

    update = Progress.update

    def sigterm_at_step_8(self, step, *args):
        update(self, step, *args)
        if step == 8:
            signal.raise_signal(signal.SIGTERM)  # the trainer's handler: finish the step, checkpoint, stop

    monkeypatch.setattr(Progress, "update", sigterm_at_step_8)
    assert main(["--resume", str(run), "--steps", "12"]) == 130
    monkeypatch.undo()
    assert read_manifest(run)["step"] == 8
    assert TrainConfig.from_json(run / "train_config.json").steps == 12
    assert main(["--resume", str(run)]) == 0
    assert read_manifest(run)["step"] == 12
    assert losses(run) == losses(ref)
