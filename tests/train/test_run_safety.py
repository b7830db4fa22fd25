"""Nothing a user does loses a run: an --out holding a run is refused unless --resume or --overwrite,
flags that cannot apply are errors, a resume keeps the run's lr schedule unless extended, files get the
user's umask, and an interrupted --compare resumes to the summary an uninterrupted one writes."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from moekit.cli.train import main
from moekit.config import TrainConfig
from moekit.train.loop import lr_at


def _snapshot(run_dir):
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


def test_second_run_into_the_same_out_is_refused_and_changes_nothing(tmp_path, flags, capsys):
    run = tmp_path / "run"
    assert main(flags(run, 2)) == 0
    before = _snapshot(run)
    capsys.readouterr()
    assert main(flags(run, 3, "--lr", "1e-3")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moekit train: error: --out {run} already holds a run") and err.count("\n") == 1
    assert f"moekit train --resume {run}" in err and "--overwrite" in err
    assert _snapshot(run) == before


def test_overwrite_removes_the_old_run_first_and_keeps_other_files(tmp_path, flags, metrics):
    run = tmp_path / "run"
    assert main(flags(run, 4)) == 0
    (run / "notes.txt").write_text("mine")
    assert main(flags(run, 2, "--overwrite")) == 0
    assert [r["step"] for r in metrics(run)] == [1, 2]
    assert json.loads((run / "trainer_state.json").read_text())["step"] == 2
    assert not (run / "checkpoints").exists() or all("step-4" not in p.name for p in (run / "checkpoints").iterdir())
    assert (run / "notes.txt").read_text() == "mine"


def test_files_follow_the_umask(tmp_path, flags):
    old = os.umask(0o027)
    try:
        run = tmp_path / "run"
        assert main(flags(run, 1)) == 0
    finally:
        os.umask(old)
    for name in ("model.safetensors", "train_state.pt", "config.json", "trainer_state.json", "tokenizer.json"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o640, name


@pytest.mark.parametrize("extra, says", [
    (["--dense", "--compare"], "--dense with --compare"),
    (["--seeds", "2"], "--seeds N runs N MoE/dense pairs: it needs --compare"),
    (["--compare", "--seeds", "0"], "--seeds 0 must be >= 1"),
    (["--extend-schedule"], "--extend-schedule stretches a resumed run's lr schedule"),
    (["--from-step", "2"], "--from-step S picks the checkpoint a --resume continues from"),
])
def test_flags_that_cannot_apply_are_usage_errors(tmp_path, flags, capsys, extra, says):
    run = tmp_path / "run"
    assert main(flags(run, 2, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("moekit train: error: ") and says in err and err.count("\n") == 1
    assert not (run / "config.json").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, flags):
    """A run trained to its end (steps 6, warmup 2), kept read-only: tests copy it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(flags(run, 6, "--warmup-steps", "2")) == 0
    return run


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("extra, says", [
    (["--experts", "8"], "--experts would change it"),
    (["--dense"], "--dense would change it"),
    (["--out", "elsewhere"], "--resume RUN continues in RUN itself"),
    (["--overwrite"], "--overwrite starts over, --resume continues"),
    (["--steps", "4"], "--steps 4: the run is at step 6 already"),
    ([], "the run is complete: it trained its 6 steps"),
])
def test_resume_refuses_what_it_would_ignore_and_writes_nothing(tmp_path, finished, capsys, extra, says):
    run = _copy(finished, tmp_path / "run")
    before = _snapshot(run)
    assert main(["--resume", str(run), "--threads", "1", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moekit train: error: ") and says in err and err.count("\n") == 1
    assert _snapshot(run) == before


def test_resume_with_more_steps_keeps_the_schedule_unless_extended(tmp_path, finished, metrics, capsys):
    cfg = TrainConfig.from_json(finished / "train_config.json")
    kept, extended = _copy(finished, tmp_path / "kept"), _copy(finished, tmp_path / "extended")
    assert main(["--resume", str(kept), "--steps", "9", "--threads", "1"]) == 0
    assert "lr schedule kept: the cosine ends at step 6" in capsys.readouterr().err
    lrs = {r["step"]: r["lr"] for r in metrics(kept)}
    floor = cfg.lr * cfg.min_lr_ratio
    assert [lrs[s] for s in (7, 8, 9)] == pytest.approx([floor] * 3)
    assert lrs[6] == pytest.approx(lr_at(6, cfg))  # the first session's steps are untouched
    # a later plain resume continues the same plan
    assert TrainConfig.from_json(kept / "train_config.json").schedule_end == 6

    assert main(["--resume", str(extended), "--steps", "9", "--extend-schedule", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    stretched = cfg.replace(steps=9)
    assert f"the cosine now ends at step 9 instead of 6; lr at step 7 goes from {floor:.3g} to " \
           f"{lr_at(7, stretched):.3g}" in err
    lrs = {r["step"]: r["lr"] for r in metrics(extended)}
    assert [lrs[s] for s in (7, 8, 9)] == pytest.approx([lr_at(s, stretched) for s in (7, 8, 9)])
    assert lrs[7] > 2 * floor


def _compare_flags(flags, out, *extra):
    return flags(out, 6, "--compare", "--seeds", "2", "--ckpt-interval", "2", "--eval-interval", "3", *extra)


def test_interrupted_compare_resumes_to_the_uninterrupted_summary(tmp_path, flags):
    ref = tmp_path / "ref"
    assert main(_compare_flags(flags, ref)) == 0
    ref_summary = json.loads((ref / "summary.json").read_text())

    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "moekit", "train", *_compare_flags(flags, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # interrupt the second seed's MoE run once it has a checkpoint: seed 0 done, seed 1 half done
    manifest = out / "moe" / "seed1" / "trainer_state.json"
    deadline = time.monotonic() + 240
    while not manifest.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, log
    assert f"moekit train --compare --resume {out}" in log
    assert not (out / "summary.json").exists() and not (out / "dense" / "seed1").exists()

    assert main(["--compare", "--resume", str(out), "--threads", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for side in ("moe", "dense"):
        got = [r["final_val_loss"] for r in summary[side]["per_seed"]]
        want = [r["final_val_loss"] for r in ref_summary[side]["per_seed"]]
        assert got == want, side  # exact: resume is bit-identical on the CPU
        assert [r["seed"] for r in summary[side]["per_seed"]] == [0, 1]
    assert summary["moe_minus_dense_val_loss"]["per_seed"] == ref_summary["moe_minus_dense_val_loss"]["per_seed"]
    html = (out / "report" / "report.html").read_text()
    assert "seed1" in html and "dense" in html
    # and once finished, a second resume only rewrites the summary
    assert main(["--compare", "--resume", str(out), "--threads", "1"]) == 0
    assert json.loads((out / "summary.json").read_text())["moe"]["per_seed"] == summary["moe"]["per_seed"]
