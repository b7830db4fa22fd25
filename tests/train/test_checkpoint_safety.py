"""Checkpoints that cannot silently go bad: an inf gradient stops the run whatever the clipping, every
file is checksummed, the previous checkpoint is kept, and each kind of damage is a named error that
leaves the files as they were."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moekit.cli.train import main
from moekit.config import ModelConfig
from moekit.nn.transformer import MoETransformer
from moekit.rundir import MANIFEST_FILE, MODEL_FILE, STATE_FILE, CheckpointError, RunDir
from moekit.rundir.checkpoints import CHECKPOINTS_DIR, file_digest
from moekit.train import loop


@pytest.fixture(scope="module")
def trained(tmp_path_factory, flags):
    """10 steps, checkpoints at 5 and 10: step 10 is the latest, step 5 is kept."""
    run_dir = tmp_path_factory.mktemp("safety") / "run"
    assert main(flags(run_dir, 10)) == 0
    return run_dir


@pytest.fixture
def run(trained, tmp_path) -> Path:
    return shutil.copytree(trained, tmp_path / "run")


def _finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(path)).values())


def _snapshot(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): file_digest(p) for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _model(run_dir: Path) -> MoETransformer:
    return MoETransformer(ModelConfig.from_json(run_dir / "config.json"))


@pytest.mark.parametrize("clip", ["1.0", "0"])
def test_an_inf_gradient_stops_the_run_with_or_without_clipping(tmp_path, flags, monkeypatch, capsys, clip):
    """A hook makes the logits' gradient inf at step 8 (the loss stays finite)."""

    class InfGradAtStep8(MoETransformer):
        calls = 0

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            if self.training:
                InfGradAtStep8.calls += 1
                if InfGradAtStep8.calls == 8:
                    out.logits.register_hook(lambda g: torch.full_like(g, float("inf")))
            return out

    monkeypatch.setattr(loop, "MoETransformer", InfGradAtStep8)
    run_dir = tmp_path / "run"
    assert main(flags(run_dir, 20, "--grad-clip", clip)) == 1
    err = capsys.readouterr().err
    assert re.search(r"the gradient norm is (inf|nan) \(loss [0-9.]+\) at step 8", err), err
    assert RunDir(run_dir).read_manifest()["step"] == 5
    weights = [run_dir / MODEL_FILE, *(run_dir / CHECKPOINTS_DIR).rglob(MODEL_FILE)]
    assert weights and all(_finite(w) for w in weights)


def test_the_manifest_records_sizes_and_digests_and_the_previous_checkpoint_is_kept(run):
    manifest = json.loads((run / MANIFEST_FILE).read_text())
    assert manifest["step"] == 10
    for name in (MODEL_FILE, STATE_FILE):
        assert manifest["files"][name] == {"bytes": (run / name).stat().st_size, "sha256": file_digest(run / name)}
    assert RunDir(run).kept_checkpoint_steps() == [5]
    older = json.loads((run / CHECKPOINTS_DIR / "step-5" / MANIFEST_FILE).read_text())
    assert older["step"] == 5


def _flip_a_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", [MODEL_FILE, STATE_FILE])
def test_a_bit_flip_is_named_with_both_digests_and_the_older_checkpoint(run, name):
    expected = json.loads((run / MANIFEST_FILE).read_text())["files"][name]["sha256"]
    _flip_a_byte(run / name)
    before = _snapshot(run)
    with pytest.raises(CheckpointError) as e:
        RunDir(run).load_checkpoint(_model(run))
    msg = str(e.value)
    assert str(run / name) in msg and expected in msg and file_digest(run / name) in msg
    assert "--from-step 5" in msg
    assert _snapshot(run) == before  # nothing overwritten


def test_a_same_size_file_from_another_step_is_caught(run):
    shutil.copy(run / CHECKPOINTS_DIR / "step-5" / MODEL_FILE, run / MODEL_FILE)  # same size, other step
    with pytest.raises(CheckpointError, match="sha256 .* but the manifest of step 10"):
        RunDir(run).load_checkpoint(_model(run))


def test_a_missing_state_file_is_named(run):
    (run / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{STATE_FILE}: missing .*--from-step 5"):
        RunDir(run).load_checkpoint(_model(run))


def test_an_invalid_json_manifest_is_named(run):
    (run / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{MANIFEST_FILE}: damaged manifest.*--from-step 5"):
        RunDir(run).load_checkpoint(_model(run))


def test_files_that_disagree_on_the_step_are_named(run):
    """Both files and a manifest that lists them, but the weights say another step inside."""
    from moekit.rundir.checkpoints import save

    model = _model(run)
    state = torch.load(run / STATE_FILE, weights_only=True)
    save(run, model, {k: v for k, v in state.items() if k != "step"}, 10)
    shutil.copy(run / CHECKPOINTS_DIR / "step-10" / MODEL_FILE, run / MODEL_FILE)  # step-10 weights ...
    torch.save({**state, "step": 7}, run / STATE_FILE)  # ... beside a state of step 7
    m = json.loads((run / MANIFEST_FILE).read_text())
    for name in (MODEL_FILE, STATE_FILE):
        m["files"][name] = {"bytes": (run / name).stat().st_size, "sha256": file_digest(run / name)}
    (run / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="disagree on the step"):
        RunDir(run).load_checkpoint(_model(run))


def test_a_damaged_config_is_a_named_error_on_resume(run, capsys):
    (run / "config.json").write_text("{oops")
    before = _snapshot(run)
    assert main(["--resume", str(run), "--steps", "12"]) == 1
    err = capsys.readouterr().err
    assert f"{run / 'config.json'}: not valid JSON" in err and "Traceback" not in err
    assert _snapshot(run) == before


def test_resume_from_the_kept_checkpoint_after_damage(run, trained, flags, tmp_path, losses):
    """The latest checkpoint is damaged; --from-step 5 resumes from the kept one and gives the losses of an
    undamaged resume from step 5. The damaged files are moved aside, not deleted."""
    _flip_a_byte(run / MODEL_FILE)
    assert main(["--resume", str(run), "--steps", "12"]) == 1  # refused, naming the way out
    assert main(["--resume", str(run), "--from-step", "5", "--steps", "12"]) == 0
    # the reference: the same run trained to 5, then resumed to 12
    ref = tmp_path / "ref"
    assert main(flags(ref, 5)) == 0
    assert main(["--resume", str(ref), "--steps", "12"]) == 0
    got, want = losses(run), losses(ref)
    assert [got[s] for s in range(6, 13)] == [want[s] for s in range(6, 13)]
    assert (run / CHECKPOINTS_DIR / "rejected-step-10" / MODEL_FILE).is_file()
    assert RunDir(run).read_manifest()["step"] == 12


def test_keep_checkpoints_bounds_what_stays_on_disk(tmp_path, flags):
    run_dir = tmp_path / "run"
    assert main(flags(run_dir, 20, "--keep-checkpoints", "3")) == 0
    assert RunDir(run_dir).kept_checkpoint_steps() == [15, 10]
    assert main(["--resume", str(run_dir), "--steps", "25", "--keep-checkpoints", "1"]) == 0
    assert RunDir(run_dir).kept_checkpoint_steps() == []


def test_from_step_needs_resume_and_a_kept_step(run, flags, tmp_path, capsys):
    assert main(flags(tmp_path / "new", 5, "--from-step", "5")) == 2
    assert "--from-step S picks the checkpoint a --resume continues from" in capsys.readouterr().err
    assert main(["--resume", str(run), "--from-step", "3", "--steps", "12"]) == 1
    assert "no checkpoint of step 3 is kept; kept: steps [5]" in capsys.readouterr().err
