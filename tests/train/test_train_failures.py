"""Failures name their cause: NaN/inf losses stop training and keep the last good checkpoint; a truncated
or mismatching checkpoint is reported with the file and the mismatch."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from moekit.cli.train import main
from moekit.config import ModelConfig
from moekit.infer import load_run
from moekit.nn.transformer import MoETransformer
from moekit.rundir import CheckpointError, load_checkpoint, load_weights, read_manifest
from moekit.train import loop


@pytest.fixture(scope="module")
def trained(tmp_path_factory, flags):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert main(flags(run_dir, 5)) == 0
    return run_dir


@pytest.fixture
def run(trained, tmp_path):
    """A private copy of the trained run, free to damage."""
    return shutil.copytree(trained, tmp_path / "run")


def _all_finite(run_dir):
    return all(torch.isfinite(t).all() for t in load_file(str(run_dir / "model.safetensors")).values())


def test_nan_loss_stops_with_step_and_last_good_checkpoint(tmp_path, flags, monkeypatch, capsys):
    """The loss becomes NaN at step 8 (the forward is patched); the step-5 checkpoint is kept."""

    class NaNAtStep8(MoETransformer):
        calls = 0

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            if self.training:
                NaNAtStep8.calls += 1
                if NaNAtStep8.calls == 8:
                    out.loss = out.loss * float("nan")
            return out

    monkeypatch.setattr(loop, "MoETransformer", NaNAtStep8)
    run_dir = tmp_path / "run"
    assert main(flags(run_dir, 20)) == 1
    err = capsys.readouterr().err
    assert "loss is nan" in err and "at step 8" in err
    assert f"the last good checkpoint (step 5) is kept in {run_dir}" in err
    assert read_manifest(run_dir)["step"] == 5
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 7
    model = MoETransformer(ModelConfig.from_json(run_dir / "config.json"))
    assert load_checkpoint(run_dir, model)["step"] == 5
    monkeypatch.undo()
    assert main(["--resume", str(run_dir)]) == 0  # the kept checkpoint resumes
    assert read_manifest(run_dir)["step"] == 20


def test_absurd_lr_stops_and_the_kept_checkpoint_is_finite(tmp_path, flags, capsys):
    """With --lr 1e6 the gradients overflow within a few steps. Training must stop before the update, so
    the checkpoint it names (one is written every step here) holds finite weights that still resume."""
    run_dir = tmp_path / "run"
    assert main(flags(run_dir, 20, "--lr", "1e6", "--ckpt-interval", "1")) == 1
    err = capsys.readouterr().err
    good = read_manifest(run_dir)["step"]
    assert f"the last good checkpoint (step {good}) is kept in {run_dir}" in err
    assert f"at step {good + 1};" in err
    assert _all_finite(run_dir)
    # the damage was done by the update *before* that checkpoint: resuming diverges again, cleanly
    before = (run_dir / "model.safetensors").read_bytes()
    assert main(["--resume", str(run_dir), "--lr", "1e-3"]) == 1
    assert f"at step {good + 1};" in capsys.readouterr().err
    assert read_manifest(run_dir)["step"] == good and (run_dir / "model.safetensors").read_bytes() == before


def test_nan_before_any_checkpoint_says_so(tmp_path, flags, capsys):
    assert main(flags(tmp_path / "run", 20, "--lr", "1e6", "--warmup-steps", "0")) == 1
    err = capsys.readouterr().err
    assert "at step" in err and "no checkpoint was written yet" in err


def test_truncated_weights_are_reported_with_the_file(run, capsys):
    weights = run / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert main(["--resume", str(run), "--steps", "10"]) == 1
    err = capsys.readouterr().err
    assert str(weights) in err and "truncated" in err
    with pytest.raises(CheckpointError, match=f"{weights}.*truncated"):
        load_run(run)
    (run / "trainer_state.json").unlink()  # without the manifest, safetensors itself rejects the file
    with pytest.raises(CheckpointError, match=f"{weights}: cannot read safetensors.*truncated"):
        load_run(run)


def test_truncated_train_state_is_reported_with_the_file(run, capsys):
    state = run / "train_state.pt"
    with open(state, "r+b") as f:
        f.truncate(100)
    assert main(["--resume", str(run), "--steps", "10"]) == 1
    assert f"{state}: 100 bytes but the manifest of step 5" in capsys.readouterr().err


def test_config_mismatch_names_the_mismatch(run, capsys):
    cfg = json.loads((run / "config.json").read_text())
    cfg["d_model"] = cfg["moe"]["d_model"] = 48
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"does not match the model config: wrong shape.*embed.weight: "
                                              r"file \(\d+, 32\) vs model \(\d+, 48\)"):
        load_run(run)
    assert main(["--resume", str(run), "--steps", "10"]) == 1
    err = capsys.readouterr().err
    assert "does not match the model config" in err and "(300, 32) vs model (300, 48)" in err
    # a different number of layers: the missing and unexpected tensors are named
    cfg_3 = ModelConfig.from_dict({**cfg, "d_model": 32, "moe": {**cfg["moe"], "d_model": 32}, "n_layers": 3})
    with pytest.raises(CheckpointError, match=r"missing \['layers\.2\."):
        load_weights(MoETransformer(cfg_3), run / "model.safetensors")


def test_not_a_run_directory(tmp_path, capsys):
    assert main(["--resume", str(tmp_path)]) == 2
    assert "not a moekit run directory" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_run(tmp_path)


def test_missing_weights_are_reported(run):
    weights = run / "model.safetensors"
    weights.unlink()
    with pytest.raises(CheckpointError, match=f"{weights}: no such weights file"):
        load_run(run)
    (run / "dcp").mkdir()  # a distributed run: the message says how to get the single-file weights
    with pytest.raises(CheckpointError, match="export_if_distributed"):
        load_run(run)
