"""Distributed checkpoints with torch.distributed.checkpoint (DCP), reshardable across EP layouts.

Every tensor is saved under its single-process name (``model.<fqn>``, ``optim.<fqn>.<state>``,
``extra.<key>``) and its *global* shape: an expert tensor of an expert-parallel layer is described to
DCP as a DTensor over the (dp, ep) mesh, ``[Replicate(), Shard(0)]`` — the L local experts are rows
``[r*L, (r+1)*L)`` of the global (E, ...) tensor. DCP writes each shard once (replicas deduplicated)
and on load reads, for whatever layout the loader has (another ep, or one process with plain full
tensors), exactly the rows it needs. So a run saved with ep=4 resumes with ep=2 or on one process.

Directory: ``<dir>/.metadata``, ``<dir>/__<rank>_0.distcp`` and ``<dir>/moekit.json`` (step, layout,
and the sha256 of every other file, checked before any load: a flipped bit is an error naming the file,
never silently wrong weights). Saves go to ``<dir>.tmp`` and are renamed into place by rank 0, the
previous one kept as ``<dir>.old`` until the rename is done, so an interrupted save never replaces a good
checkpoint with a torn one (``resolve_dcp_dir`` falls back to ``.old``).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn

from moekit.nn.moe import expert_parameter_ids
from moekit.parallel.dcp_kept import retire_previous
from moekit.parallel.fsdp import FSDPLayout
from moekit.parallel.groups import ParallelGroups, barrier, collective
from moekit.rundir import CheckpointError, atomic_write, atomic_write_json
from moekit.rundir.checkpoints import file_digest

__all__ = ["export_dcp_to_safetensors", "load_dcp", "read_dcp_info", "resolve_dcp_dir", "save_dcp"]

INFO_FILE = "moekit.json"


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _digests(d: Path) -> dict[str, str]:
    """sha256 of every file DCP wrote in ``d`` (not moekit.json, which records them)."""
    return {p.name: file_digest(p) for p in sorted(d.iterdir()) if p.is_file() and p.name != INFO_FILE}


def _verify(src: Path, on_all_ranks: bool) -> None:
    """Check the files of ``src`` against the digests recorded at save; raise CheckpointError naming the file.

    ``on_all_ranks``: collective — rank r hashes every W-th file and all ranks raise the same error.
    A checkpoint saved before digests were recorded is not checked.
    """
    want = read_dcp_info(src).get("sha256")
    if not want:
        return
    rank, world = (dist.get_rank(), dist.get_world_size()) if on_all_ranks else (0, 1)
    problems = []
    for name in sorted(want)[rank::world]:
        f = src / name
        got = file_digest(f) if f.is_file() else "missing"
        if got != want[name]:
            problems.append(f"{f}: sha256 {got} does not match {want[name]}, recorded at save in {src / INFO_FILE}")
    if on_all_ranks:
        every: list[Any] = [None] * world
        collective("checking the checkpoint's sha256 digests", lambda: dist.all_gather_object(every, problems))
        problems = [p for part in every for p in part]
    if problems:
        raise CheckpointError(f"the distributed checkpoint is corrupt: {problems[0]}"
                              + (f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else "")
                              + "; nothing was loaded")


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns on every single-process save/load, even when asked for one (no_dist=True)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


def _wrap(t: Tensor, sharded: bool, groups: ParallelGroups | None, fsdp: FSDPLayout | None) -> Any:
    """Describe an expert shard as its slice of the global tensor; anything else is replicated.

    FSDP: a non-expert DTensor already has its global shape; an expert one (L, ...) is this EP rank's
    experts, re-described on the (ep, dp) mesh as rows of the global (E, ...) tensor: the EP split first,
    FSDP's inside it (both torch.chunk rows, as FSDP shards).
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if isinstance(t, DTensor):
        if not sharded:
            return t
        if fsdp is None:
            raise ValueError("an FSDP-sharded expert tensor needs the FSDPLayout to be checkpointed")
        shape = torch.Size((t.shape[0] * fsdp.groups.ep_size, *t.shape[1:]))
        return DTensor.from_local(t.to_local(), fsdp.ckpt_mesh, [Shard(0), Shard(0)], run_check=False,
                                  shape=shape, stride=torch.empty(shape, device="meta").stride())
    if not sharded or groups is None or t.dim() == 0:
        return t
    return DTensor.from_local(t, groups.mesh, [Replicate(), Shard(0)], run_check=False)


def _init_adam_state(opt: torch.optim.Optimizer) -> None:
    """Adam/AdamW create their state at the first step; DCP needs tensors to load into before that."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _state(model: nn.Module, opt: torch.optim.Optimizer | None, groups: ParallelGroups | None,
           extra: dict[str, Tensor] | None, *, copy: bool,
           fsdp: FSDPLayout | None = None) -> tuple[dict[str, Any], list[tuple[Tensor, Any]]]:
    """The DCP state dict, and (destination, source) pairs to copy back after a load."""
    experts = expert_parameter_ids(model)
    expert_names = {name for name, p in model.named_parameters() if id(p) in experts}
    pairs: list[tuple[Tensor, Any]] = []

    def entry(dst: Tensor, sharded: bool) -> Any:
        src = dst.detach().clone() if copy else dst.detach()
        wrapped = _wrap(src, sharded, groups, fsdp)
        pairs.append((dst, wrapped))
        return wrapped

    sd: dict[str, Any] = {"model": {k: entry(v, k in expert_names) for k, v in model.state_dict().items()}}
    if opt is not None:
        _init_adam_state(opt)
        names = {id(p): n for n, p in model.named_parameters()}
        sd["optim"] = {}
        for group in opt.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                for k, v in opt.state[p].items():
                    if isinstance(v, Tensor):
                        sd["optim"][f"{name}.{k}"] = entry(v, id(p) in experts)
    if extra:
        sd["extra"] = {k: entry(v, False) for k, v in extra.items()}
    return sd, pairs


def save_dcp(path: str | Path, model: nn.Module, opt: torch.optim.Optimizer | None = None,
             groups: ParallelGroups | None = None, extra: dict[str, Tensor] | None = None,
             info: dict[str, Any] | None = None, fsdp: FSDPLayout | None = None, keep: int = 1) -> None:
    """Save model (+ optimizer state, + extra tensors) to the DCP directory ``path``; collective.

    ``groups`` None: one process (no process group), every tensor local and full. ``fsdp``: the layout
    of a model sharded by :func:`moekit.parallel.fsdp.apply_fsdp`. ``keep``: checkpoints kept in all, the
    previous ones under ``checkpoints/dcp-step-<S>`` (moekit.parallel.dcp_kept).
    """
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    main = not _dist_on() or dist.get_rank() == 0
    if main and tmp.exists():
        shutil.rmtree(tmp)
    if _dist_on():
        barrier("checkpoint save")
    sd, _ = _state(model, opt, groups, extra, copy=False, fsdp=fsdp)
    with _single_process_ok():
        collective("distributed checkpoint save",
                   lambda: dcp.save(sd, checkpoint_id=str(tmp), no_dist=not _dist_on()))
    if main:
        meta = dict(info or {}, format="moekit-dcp", world_size=dist.get_world_size() if _dist_on() else 1,
                    ep_size=groups.ep_size if groups is not None else 1, fsdp=fsdp is not None,
                    sha256=_digests(tmp))
        atomic_write_json(tmp / INFO_FILE, meta)
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            retire_previous(path, old, keep)
    if _dist_on():
        barrier("checkpoint save")


def resolve_dcp_dir(path: str | Path) -> Path:
    """``path`` if complete, else the ``.old`` one a save interrupted between its renames left behind."""
    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    old = path.with_name(path.name + ".old")
    if (old / ".metadata").is_file():
        return old
    raise FileNotFoundError(f"{path}: no distributed checkpoint there (no .metadata)")


def read_dcp_info(path: str | Path) -> dict[str, Any]:
    p = resolve_dcp_dir(path) / INFO_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def load_dcp(path: str | Path, model: nn.Module, opt: torch.optim.Optimizer | None = None,
             groups: ParallelGroups | None = None, extra: dict[str, Tensor] | None = None,
             fsdp: FSDPLayout | None = None) -> dict[str, Tensor]:
    """Load a DCP checkpoint into ``model`` (and ``opt``), resharding experts to this layout; collective.

    ``extra``: name -> template tensor of the extra entries to read. Returns them loaded.
    """
    src = resolve_dcp_dir(path)
    _verify(src, on_all_ranks=_dist_on())
    sd, pairs = _state(model, opt, groups, extra, copy=True, fsdp=fsdp)
    try:
        with _single_process_ok():
            dcp.load(sd, checkpoint_id=str(src), no_dist=not _dist_on())
    except dcp.CheckpointException as e:  # raised on every rank, names the failing keys
        msg = str(e).strip().splitlines()
        raise ValueError(f"{src}: the checkpoint does not fit this model (another config?): "
                         f"{msg[0][:500] if msg else type(e).__name__}") from e
    with torch.no_grad():
        for dst, loaded in pairs:
            local = loaded.to_local() if hasattr(loaded, "to_local") else loaded
            # an FSDP parameter's local shard is a view of its storage: copying into it loads the param
            (dst.to_local() if hasattr(dst, "to_local") else dst).copy_(local)
    return {k: v for k, v in (sd.get("extra") or {}).items()}


def export_dcp_to_safetensors(dcp_dir: str | Path, out_file: str | Path) -> Path:
    """Write the model of a DCP checkpoint as one single-process safetensors file (full (E, ...) experts).

    Keys are the single-process ``state_dict`` names (what ``moekit.rundir.load_weights`` reads); the metadata records the step. Runs in one process, with or without a process group.
    """
    from safetensors.torch import save_file
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    src = resolve_dcp_dir(dcp_dir)
    _verify(src, on_all_ranks=False)
    md = FileSystemReader(str(src)).read_metadata()
    want = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata) and (k.startswith("model.") or k == "extra.step")}
    with _single_process_ok():
        dcp.load(want, checkpoint_id=str(src), no_dist=True)
    info = read_dcp_info(src)
    step = int(want["extra.step"]) if "extra.step" in want else info.get("step", -1)
    tensors = {k[len("model."):]: v.contiguous() for k, v in want.items() if k.startswith("model.")}
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata={"step": str(step),
                                                                              "source": "moekit-dcp"}))
