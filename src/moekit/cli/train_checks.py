"""What `moekit train` refuses before it touches a directory: flags that cannot apply together, an --out
that already holds a run, and a --resume whose --steps would silently re-stretch the lr schedule."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from moekit.cli.errors import UsageError
from moekit.cli.flags import flag_name
from moekit.config import TrainConfig
from moekit.rundir.occupancy import holds_run, remove_run

__all__ = ["check_flags", "claim_out_dir", "resumed_train_config"]


def check_flags(given: dict[str, Any], model_dests: dict[str, str]) -> None:
    """Flags that would be ignored or contradict each other are refused (a UsageError names them)."""
    resume = "resume" in given
    pairs = [("dense", "compare", "--compare trains the dense twin itself: drop --dense"),
             ("overwrite", "resume", "--overwrite starts over, --resume continues: pick one"),
             ("out", "resume", "--resume RUN continues in RUN itself: drop --out"),
             ("config", "resume", "--resume uses the run's own configs: drop --config (training flags "
                                  "such as --steps still apply)")]
    for a, b, why in pairs:
        if a in given and b in given:
            raise UsageError(f"{flag_name(a)} with {flag_name(b)}: {why}")
    if "seeds" in given and "compare" not in given:
        raise UsageError("--seeds N runs N MoE/dense pairs: it needs --compare")
    if "seeds" in given and given["seeds"] < 1:
        raise UsageError(f"--seeds {given['seeds']} must be >= 1")
    if "jobs" in given and "compare" not in given:
        raise UsageError("--jobs N trains a comparison's MoE and dense runs at the same time: it needs --compare")
    if "jobs" in given and given["jobs"] not in (1, 2):
        raise UsageError(f"--jobs {given['jobs']}: a comparison trains two runs per seed, so 1 (one after the "
                         "other) or 2 (side by side)")
    if "from_step" in given and not resume:
        raise UsageError("--from-step S picks the checkpoint a --resume continues from: add --resume RUN")
    if "extend_schedule" in given and not resume:
        raise UsageError("--extend-schedule stretches a resumed run's lr schedule: it needs --resume RUN")
    if resume and "init_from" not in given:
        model = sorted(flag_name(d) for d in model_dests if d in given)
        if "dense" in given:
            model.append("--dense")
        if model:
            raise UsageError(f"--resume continues the run's own model; {', '.join(model)} would change it: "
                             "drop them (or start a new run with --out)")


def claim_out_dir(out: Path, *, overwrite: bool, compare: bool) -> None:
    """Refuse an --out that holds a run unless --overwrite, which removes the old run's files first."""
    if not holds_run(out):
        return
    if overwrite:
        removed = remove_run(out)
        print(f"--overwrite: removed the previous run in {out} ({len(removed)} entries)", file=sys.stderr)
        return
    resume = f"moekit train {'--compare ' if compare else ''}--resume {out}"
    hint = os.environ.get("MOEKIT_DEMO_HINT")  # `make demo` names its own forms of the two choices
    choices = hint or f"continue it with `{resume}` or start over with --overwrite (its files are removed)"
    raise UsageError(f"--out {out} already holds a run: {choices}; or pick another --out")


def resumed_train_config(run_cfg: TrainConfig, overrides: dict[str, Any], step: int, *,
                         extend_schedule: bool, lr_at) -> TrainConfig:
    """The training config of a resume from ``step``: the run's own, with this invocation's overrides.

    The lr schedule stays the run's: a larger --steps trains on at the end of the cosine (its floor) unless
    --extend-schedule stretches the cosine to the new --steps; either way what changes is printed."""
    cfg = run_cfg.replace(**overrides)
    if cfg.steps <= step:
        what = f"--steps {cfg.steps}: the run is at step {step} already" if "steps" in overrides else \
            f"the run is complete: it trained its {cfg.steps} steps"
        raise UsageError(f"{what}; pass --steps N > {step} to train on (the lr schedule is kept; "
                         "--extend-schedule stretches it)")
    if cfg.steps == run_cfg.steps and not extend_schedule:
        return cfg
    if extend_schedule:
        new = cfg.replace(schedule_steps=cfg.steps)
        old_lr, new_lr = lr_at(step + 1, cfg.replace(schedule_steps=run_cfg.schedule_end)), lr_at(step + 1, new)
        print(f"lr schedule extended: the cosine now ends at step {cfg.steps} instead of "
              f"{run_cfg.schedule_end}; lr at step {step + 1} goes from {old_lr:.3g} to {new_lr:.3g}",
              file=sys.stderr)
        return new
    kept = cfg.replace(schedule_steps=run_cfg.schedule_end)
    if cfg.steps > run_cfg.schedule_end:
        print(f"lr schedule kept: the cosine ends at step {run_cfg.schedule_end}, so steps "
              f"{max(step, run_cfg.schedule_end) + 1}-{cfg.steps} train at its floor "
              f"{cfg.lr * cfg.min_lr_ratio:.3g}; add --extend-schedule to stretch it to {cfg.steps}",
              file=sys.stderr)
    return kept
