"""Training runs at the same time, each in a process of its own: ``moekit train --compare --jobs 2``.

Why: this is a 2-core machine and the default LM is small. At 2 intra-op threads the MoE's many small ops
parallelize worse than the dense FFN's few large ones (MoE / dense tokens/s 0.83-0.87), at 1 thread the
two are close (0.91-0.93). Training the pair side by side at 1 thread each keeps both cores busy and
compares them where the per-token overhead of the MoE matters least, under the same load: each run shares
the machine with the other for as long as both train.

Each child runs :func:`moekit.train.loop.train` (its own SIGINT/SIGTERM handling: finish the step,
checkpoint, return) and prints plain progress lines under its label (two live displays would overwrite
each other). SIGINT or SIGTERM to the parent is passed on to the children (a second SIGINT, when the
terminal sent one to every process, changes nothing).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.config import ModelConfig, TrainConfig
from moekit.data import DataInfo

__all__ = ["Job", "train_side_by_side"]


@dataclass(frozen=True)
class Job:
    """One run to train: :func:`moekit.train.loop.train`'s arguments."""

    model_cfg: ModelConfig
    cfg: TrainConfig
    run_dir: Path
    data: DataInfo
    resume: bool
    label: str


def train_side_by_side(jobs: list[Job], threads: int) -> list[Any]:
    """Train every job at the same time, ``threads`` intra-op threads each; their ``TrainResult`` in order.
    A job that raised re-raises here (after the others have finished)."""
    ctx = mp.get_context("spawn")  # a fresh interpreter: no copy of this process's threads or locks
    procs, pipes = [], []
    for job in jobs:
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(job, threads, send), name=f"moekit-train-{job.label}")
        proc.start()
        send.close()
        procs.append(proc)
        pipes.append(receive)

    def forward(signum, frame):  # each child finishes its step, checkpoints and returns
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signum)

    old = signal.signal(signal.SIGINT, forward), signal.signal(signal.SIGTERM, forward)
    try:
        answers = [_answer(receive, proc, job) for receive, proc, job in zip(pipes, procs, jobs)]
    finally:
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGTERM, old[1])
    for a in answers:
        if isinstance(a, BaseException):
            raise a
    return answers


def _answer(receive, proc, job: Job) -> Any:
    try:
        answer = receive.recv()
    except EOFError:
        answer = RuntimeError(f"the training process of {job.label} ({job.run_dir}) died (exit code "
                              f"{proc.exitcode}); resume it with: moekit train --compare --resume")
    proc.join()
    return answer


class _Lines:
    """stderr as a file that is not a terminal: rich then prints progress lines instead of a live display."""

    def __init__(self, stream):
        self._stream = stream

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _child(job: Job, threads: int, send) -> None:
    from moekit.runtime import configure
    from moekit.train.loop import train

    configure(threads)  # as the CLI does for every command
    sys.stderr = _Lines(sys.stderr)
    try:
        result: Any = train(job.model_cfg, job.cfg, job.run_dir, job.data, resume=job.resume, label=job.label)
    except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it as its own
        result = e
    try:
        send.send(result)
    except Exception as e:  # noqa: BLE001 - an exception that does not pickle: its text does
        send.send(RuntimeError(f"{type(result).__name__}: {result} ({e})"))
