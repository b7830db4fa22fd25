"""Process groups for expert parallel x data parallel, and the guards every distributed run needs.

The world of N ranks is laid out as a (dp, ep) grid, row-major: the ``ep`` consecutive ranks
``[g*ep, (g+1)*ep)`` form expert-parallel group g and share one copy of every expert between them;
ranks ``{r, r+ep, r+2ep, ...}`` form the data-parallel group of EP rank r and hold the same experts.

    world 4, ep 2:   EP groups {0,1} {2,3}     DP groups {0,2} {1,3}

This is the only package of moekit that imports ``torch.distributed`` (STYLE: parallel/).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "CollectiveError",
    "ParallelGroups",
    "all_gather_tensor",
    "all_reduce_",
    "barrier",
    "build_groups",
    "check_same_config",
    "collective",
    "config_digest",
    "destroy",
    "init_distributed",
    "lost_ranks",
    "pick_backend",
]

T = TypeVar("T")


class CollectiveError(RuntimeError):
    """A collective failed: another rank exited, hung past the timeout, or disagrees with this one."""


@dataclass(frozen=True)
class _World:
    """Who the peers are, recorded by :func:`init_distributed`: lets an error name a rank that died.

    Process-wide like the default process group itself (the all-to-all's autograd function, which
    raises the error, holds no groups object).
    """

    procs: tuple[tuple[str, int], ...]  # rank -> (hostname, pid)
    timeout_s: float


_WORLD: list[_World] = []  # [] before init_distributed (e.g. a process group made by someone else)


def _process_gone(pid: int) -> bool:
    """The process has exited (or is a zombie not yet reaped by its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):  # no /proc: ask the kernel (a zombie then counts as alive)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def lost_ranks(wait_s: float = 1.0) -> list[int]:
    """The ranks on this host whose process has exited; waits up to ``wait_s`` for one to show up.

    A peer's socket closes as it dies, a moment before the kernel marks it exited. Ranks on other hosts
    cannot be checked and are never reported.
    """
    if not _WORLD:
        return []
    host, me = socket.gethostname(), os.getpid()
    mine = [(r, pid) for r, (h, pid) in enumerate(_WORLD[0].procs) if h == host and pid != me]
    deadline = time.monotonic() + wait_s
    while True:
        lost = [r for r, pid in mine if _process_gone(pid)]
        if lost or time.monotonic() >= deadline:
            return lost
        time.sleep(0.05)


def collective(what: str, fn: Callable[[], T], group: Any = None) -> T:
    """Run one collective; turn the backend's error (a dead peer, a timeout) into a message that says so.

    gloo notices a peer that exited at once (its socket closes): the error names the lost rank. A peer
    that is alive but never joins is detected after the timeout given to :func:`init_distributed`.
    """
    try:
        return fn()
    except (RuntimeError, ValueError) as e:
        if isinstance(e, CollectiveError):
            raise
        rank = dist.get_rank() if dist.is_initialized() else 0
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        detail = f"{type(e).__name__}: {first[:240]}"  # gloo's messages run on (advice, "GLHF")
        lost = lost_ranks()
        if lost:
            procs = _WORLD[0].procs
            who = ", ".join(f"rank {r} (pid {procs[r][1]})" for r in lost)
            cause = f"lost {who}: its process exited or was killed"
        else:
            timeout = f" ({_WORLD[0].timeout_s:g} s)" if _WORLD else ""
            cause = f"another rank exited or did not answer within the process-group timeout{timeout}"
        raise CollectiveError(f"rank {rank}: {what} failed: {cause} ({detail}); this rank stops too") from e


def pick_backend(cuda_available: bool) -> str:
    """gloo on CPU; with CUDA, NCCL for CUDA tensors and gloo for the CPU ones (one group serves both)."""
    return "cpu:gloo,cuda:nccl" if cuda_available else "gloo"


def init_distributed(backend: str, rank: int, world_size: int, timeout_s: float = 300.0) -> None:
    """``init_process_group`` from MASTER_ADDR/MASTER_PORT (env://), with a finite timeout.

    The timeout bounds every collective (gloo and NCCL), so a rank that hangs makes the others fail
    with :class:`CollectiveError` instead of waiting forever.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be > 0")
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    procs: list[Any] = [None] * world_size
    collective("exchanging the ranks' process ids",
               lambda: dist.all_gather_object(procs, (socket.gethostname(), os.getpid())))
    _WORLD[:] = [_World(tuple(tuple(p) for p in procs), timeout_s)]


def destroy() -> None:
    _WORLD.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(what: str = "barrier", group: Any = None) -> None:
    collective(what, lambda: dist.barrier(group=group))


@dataclass
class ParallelGroups:
    """Where this rank sits in the (dp, ep) grid, and the groups to talk over."""

    rank: int
    world_size: int
    ep_size: int
    ep_group: Any  # ProcessGroup: this rank's expert-parallel group
    dp_group: Any  # ProcessGroup: the ranks holding the same experts as this one
    mesh: Any  # DeviceMesh (dp, ep): used to describe expert shards to torch.distributed.checkpoint

    @property
    def dp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep_size


def build_groups(ep_size: int, device_type: str = "cpu") -> ParallelGroups:
    """Split the initialised world into EP groups of ``ep_size`` consecutive ranks and their DP groups.

    Every rank must call this with the same ``ep_size`` (collective: it creates sub-groups).
    """
    if not dist.is_initialized():
        raise RuntimeError("build_groups needs torch.distributed initialised (see init_distributed)")
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if not isinstance(ep_size, int) or ep_size < 1 or world % ep_size:
        raise ValueError(f"ep={ep_size!r} must be an integer >= 1 dividing the world size {world}")
    mesh = collective("creating the (dp, ep) process groups",
                      lambda: init_device_mesh(device_type, (world // ep_size, ep_size), mesh_dim_names=("dp", "ep")))
    return ParallelGroups(rank=dist.get_rank(), world_size=world, ep_size=ep_size, ep_group=mesh.get_group("ep"),
                          dp_group=mesh.get_group("dp"), mesh=mesh)


def config_digest(obj: Any) -> str:
    """sha256 of a JSON-able object (dataclass dicts), keys sorted."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def check_same_config(obj: Any, what: str = "config", group: Any = None) -> None:
    """All-gather a hash of ``obj``; raise on every rank, naming the ranks that differ from the group's first.

    Run once at setup: ranks built from different configs would otherwise exchange mismatched tensors
    (a hang or garbage), not fail.
    """
    mine = config_digest(obj)
    size = dist.get_world_size(group)
    digests: list[Any] = [None] * size
    collective(f"comparing the {what} across ranks", lambda: dist.all_gather_object(digests, mine, group=group))
    if len(set(digests)) > 1:
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(size))
        bad = [ranks[i] for i, d in enumerate(digests) if d != digests[0]]
        me = dist.get_rank()
        raise CollectiveError(
            f"rank {me}: the {what} differs across ranks: rank(s) {bad} disagree with rank {ranks[0]} "
            f"(sha256 {digests[0][:12]} vs {[digests[ranks.index(b)][:12] for b in bad]}); every rank "
            "must be started with the same configuration"
        )


def all_reduce_(t: torch.Tensor, what: str, group: Any = None) -> torch.Tensor:
    """In-place SUM all-reduce with the friendly error."""
    collective(what, lambda: dist.all_reduce(t, group=group))
    return t


def all_gather_tensor(t: torch.Tensor, what: str, group: Any = None) -> torch.Tensor:
    """Stack every rank's (same-shape) ``t``: returns (W, *t.shape)."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    collective(what, lambda: dist.all_gather(out, t.contiguous(), group=group))
    return torch.stack(out)
