"""Where `moekit train` runs: torchrun for --nproc, and the training Runtime for this process.

The only reader of the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK) and of MOEKIT_STOP_FILE,
the launcher's handshake: when SIGINT/SIGTERM stops the ranks (each checkpoints the agreed step and
exits 130, which torchrun reports as a failure), rank 0 writes the step there and ``moekit train
--nproc`` exits 130 like a one-process run.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from moekit.config import ParallelConfig
from moekit.rundir import RunDir
from moekit.train.runtime import LocalRuntime, Runtime

__all__ = ["launch_torchrun", "make_runtime"]


# the launcher's own flags: torchrun's, not passed on to the ranks
_LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint")


def torchrun_args(nproc: int, pcfg: ParallelConfig | None = None) -> list[str]:
    """torchrun's flags: one machine (--standalone), or node ``node_rank`` of ``nnodes`` joining the c10d
    rendezvous at ``rdzv_endpoint`` (the same command on every node; NCCL or gloo is picked per rank)."""
    if pcfg is None or pcfg.nnodes == 1 and pcfg.rdzv_endpoint is None:
        return ["--standalone", f"--nproc-per-node={nproc}"]
    return [f"--nnodes={pcfg.nnodes}", f"--node-rank={pcfg.node_rank}", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={pcfg.rdzv_endpoint}", "--rdzv-id=moekit"]


def launch_torchrun(argv: list[str], nproc: int, pcfg: ParallelConfig | None = None) -> int:
    """``moekit train --nproc N ARGS`` = ``torchrun --standalone --nproc-per-node N -m moekit train ARGS``;
    with ``--nnodes M --node-rank R --rdzv-endpoint HOST:PORT``, torchrun's c10d rendezvous instead."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in _LAUNCH_FLAGS:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in _LAUNCH_FLAGS)):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(nproc, pcfg),
           "-m", "moekit", "train", *rest]
    print("moekit train: launching " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    fd, stop_file = tempfile.mkstemp(prefix="moekit-stop-", suffix=".json")
    os.close(fd)
    os.unlink(stop_file)  # rank 0 creates it only when the run stops on a signal
    try:
        rc = _wait(subprocess.Popen(cmd, env=dict(os.environ, MOEKIT_STOP_FILE=stop_file)))
        if Path(stop_file).is_file():
            step = json.loads(Path(stop_file).read_text()).get("step")
            print(f"moekit train: interrupted; every rank checkpointed step {step} (the exit codes 130 above are "
                  "theirs)", file=sys.stderr)
            return 130
        return rc
    finally:
        Path(stop_file).unlink(missing_ok=True)


def _wait(proc: subprocess.Popen) -> int:
    """Wait for torchrun; a SIGTERM is passed on to it, a Ctrl-C (which the ranks get too) is not repeated."""
    def forward(signum, frame):
        proc.send_signal(signum)

    old = {signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
           signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
    try:
        return proc.wait()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def make_runtime(pcfg: ParallelConfig, run_dir: Path, *, resume: bool, compare: bool) -> Runtime:
    """A DistributedRuntime when started by torchrun (WORLD_SIZE in the environment), or when resuming a
    DCP run on one process; a LocalRuntime for a plain single-process run."""
    ep = pcfg.ep
    if "WORLD_SIZE" not in os.environ:
        if ep != 1:
            raise ValueError(f"--ep {ep} needs a multiple of {ep} processes: add --nproc N or use torchrun")
        if pcfg.param_dtype or pcfg.reduce_dtype:
            raise ValueError("--param-dtype / --reduce-dtype are FSDP's mixed-precision policy: they need "
                             "a distributed run (--nproc N or torchrun)")
        if resume and RunDir(run_dir).has_dcp():
            # imported only here: torch.distributed.checkpoint costs seconds of start-up on a plain run
            from moekit.train.distributed import DistributedRuntime

            return DistributedRuntime(None, run_dir, param_dtype=pcfg.param_dtype,
                                      reduce_dtype=pcfg.reduce_dtype)  # a distributed run, resumed on one process
        return LocalRuntime()
    if compare:
        raise ValueError("--compare trains single-process runs; drop --nproc/--ep (or torchrun)")
    from moekit.parallel import build_groups, init_distributed, pick_backend
    from moekit.parallel.groups import destroy
    from moekit.train.distributed import DistributedRuntime

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    init_distributed(pick_backend(cuda), rank, world, pcfg.dist_timeout)
    atexit.register(destroy)
    groups = build_groups(ep)
    if rank != 0:  # rank 0 reports; the others keep stderr for their own errors
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    stop_file = os.environ.get("MOEKIT_STOP_FILE") if rank == 0 else None
    return DistributedRuntime(groups, run_dir, stop_file=Path(stop_file) if stop_file else None, fsdp=pcfg.fsdp,
                              param_dtype=pcfg.param_dtype, reduce_dtype=pcfg.reduce_dtype)
