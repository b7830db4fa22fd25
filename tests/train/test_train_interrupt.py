"""Killed runs resume exactly: SIGKILL at an arbitrary step, SIGTERM (checkpoint, exit 130), and a crash
inside a checkpoint save, which must never leave a run directory that cannot be resumed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from moekit.cli.train import main
from moekit.config import ModelConfig
from moekit.nn.transformer import MoETransformer
from moekit.rundir import files as ckpt_files
from moekit.rundir import load_checkpoint, read_manifest, save_checkpoint
from moekit.rundir import run as ckpt

STEPS = 40
# noisy_topk: the global RNG matters; warmup 3: most steps are in the cosine part of the schedule
RUN = ["--router", "noisy_topk", "--warmup-steps", "3"]


def _start(cmd_flags, cwd):
    cwd.mkdir(parents=True, exist_ok=True)
    with open(cwd / "train.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "moekit", "train", *cmd_flags], cwd=cwd, stdout=log,
                                stderr=subprocess.STDOUT)


def _manifest_step(run_dir) -> int:
    try:
        return json.loads((run_dir / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def _interrupt_when_ready(procs, plan, root, timeout=180.0):
    """Poll each run's manifest (the commit point of a checkpoint); signal a process once it shows the
    planned step."""
    pending, deadline = set(plan), time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for how in list(pending):
            sig, at = plan[how]
            if _manifest_step(root / how / "run") >= at:
                procs[how].send_signal(sig)
                pending.discard(how)
            elif procs[how].poll() is not None:
                pending.discard(how)  # exited on its own: the tests report the exit code and log
        time.sleep(0.005)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, flags, losses):
    """Two training processes, one SIGKILLed once its manifest shows step >= 10, one sent SIGTERM at
    step >= 5; meanwhile the reference (the same run, never interrupted) trains in this process.

    Returns (reference losses, {"kill" | "term": (run_dir, exit code, log)}).
    """
    root = tmp_path_factory.mktemp("interrupted")
    plan = {"kill": (signal.SIGKILL, 10), "term": (signal.SIGTERM, 5)}
    procs = {how: _start(flags(root / how / "run", STEPS, *RUN), root / how) for how in plan}
    watcher = threading.Thread(target=_interrupt_when_ready, args=(procs, plan, root), daemon=True)
    watcher.start()
    try:
        ref_dir = root / "reference"
        assert main(flags(ref_dir, STEPS, *RUN)) == 0  # the signal handlers need the main thread
        watcher.join()
        rcs = {how: procs[how].wait(timeout=120) for how in plan}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    reference = losses(ref_dir)
    assert sorted(reference) == list(range(1, STEPS + 1))
    return reference, {how: (root / how / "run", rcs[how], (root / how / "train.log").read_text())
                       for how in plan}


def test_sigkill_then_resume_gives_the_uninterrupted_losses(runs, losses, metrics):
    reference, interrupted = runs
    run_dir, rc, log = interrupted["kill"]
    assert rc == -signal.SIGKILL, log
    killed_at = read_manifest(run_dir)["step"]
    assert 10 <= killed_at < STEPS  # really killed mid-run
    # what a kill can leave after the checkpoint: records of later steps and a torn last line
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": STEPS + 1, "loss": 0.0}) + "\n" + '{"step": 99, "lo')
    assert main(["--resume", str(run_dir)]) == 0  # the run's own config: --steps STEPS
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, STEPS + 1))  # steps past the checkpoint
    assert losses(run_dir) == reference  # were truncated from metrics.jsonl and recomputed identically


def test_sigterm_checkpoints_exits_130_and_resumes(runs, losses, metrics):
    reference, interrupted = runs
    run_dir, rc, log = interrupted["term"]
    assert rc == 130, log
    stopped = read_manifest(run_dir)["step"]
    assert f"interrupted at step {stopped}; checkpoint saved" in log
    assert 5 <= stopped < STEPS
    assert metrics(run_dir)[-1]["step"] == stopped  # the checkpoint is of the last step it ran
    assert main(["--resume", str(run_dir)]) == 0
    assert losses(run_dir) == reference


def _state(step):
    return {"optimizer": {"state": {}, "param_groups": []}, "data_rng": torch.full((4,), step),
            "torch_rng": torch.get_rng_state()}


@pytest.mark.parametrize("crash_at", ["torch.save", "replace 0 (keep the previous checkpoint)",
                                      "replace 1 (manifest)", "replace 2 (model)", "replace 3 (state)"])
def test_a_crash_inside_a_save_leaves_a_loadable_checkpoint(crash_at, tmp_path, monkeypatch):
    """Simulate a SIGKILL at each point of save_checkpoint by raising there: loading then gives one whole
    checkpoint, the previous one (crash before the manifest is written) or the new one (after)."""
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2,
                      moe={"d_model": 16, "d_hidden": 8, "num_experts": 4, "top_k": 2})
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    save_checkpoint(tmp_path, model, _state(5), 5)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    new = {k: v.clone() for k, v in model.state_dict().items()}

    class Crash(BaseException):
        pass

    if crash_at == "torch.save":
        monkeypatch.setattr(ckpt.torch, "save", lambda *a, **k: (_ for _ in ()).throw(Crash()))
    else:
        n_ok, real_replace, calls = int(crash_at.split()[1]), os.replace, []

        def replace(src, dst):
            calls.append(dst)
            if len(calls) > n_ok:
                raise Crash()
            real_replace(src, dst)

        monkeypatch.setattr(ckpt_files.os, "replace", replace)
    with pytest.raises(Crash):
        save_checkpoint(tmp_path, model, _state(10), 10)
    monkeypatch.undo()

    fresh = MoETransformer(cfg)
    state = load_checkpoint(tmp_path, fresh)
    step = 5 if crash_at.split(" (")[0] in ("torch.save", "replace 0", "replace 1") else 10
    assert state["step"] == step and int(state["data_rng"][0]) == step
    expected = old if step == 5 else new
    assert all(torch.equal(fresh.state_dict()[k], expected[k]) for k in expected)
    save_checkpoint(tmp_path, model, _state(15), 15)  # and the next save works as usual
    assert load_checkpoint(tmp_path, MoETransformer(cfg))["step"] == 15
    assert not list(tmp_path.glob("*.tmp"))
