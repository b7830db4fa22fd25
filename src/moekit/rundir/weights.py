"""Model weights in safetensors: save, verified load, and building a model straight from stored tensors."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from moekit.config import ModelConfig
from moekit.rundir.files import CONFIG_FILE, atomic_write

if TYPE_CHECKING:
    from moekit.nn.transformer import MoETransformer

__all__ = ["CheckpointError", "load_weights", "materialise", "save_weights"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or does not match the model."""


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def save_weights(model: nn.Module, path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> None:
    atomic_write(path, lambda tmp: save_file(_state_tensors(model), str(tmp), metadata=metadata or {}))


@contextmanager
def _open_weights(path: Path) -> Iterator[Any]:
    """``safe_open`` of a weights file (memory-mapped); CheckpointError names a missing or damaged file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), "pt") as f:
            yield f
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors ({e}); the file is truncated or damaged") from e


def _check_match(path: Path, model_shapes: dict[str, tuple], file_shapes: dict[str, tuple], strict: bool) -> None:
    missing = sorted(set(model_shapes) - set(file_shapes))
    unexpected = sorted(set(file_shapes) - set(model_shapes))
    wrong = [f"{k}: file {file_shapes[k]} vs model {s}"
             for k, s in model_shapes.items() if k in file_shapes and file_shapes[k] != s]
    if wrong or (strict and (missing or unexpected)):
        raise CheckpointError(
            f"{path} does not match the model config: "
            + "; ".join(filter(None, [f"missing {missing[:5]}" if missing else "",
                                      f"unexpected {unexpected[:5]}" if unexpected else "",
                                      f"wrong shape {wrong[:5]}" if wrong else ""]))
            + f". Check that {CONFIG_FILE} belongs to these weights."
        )


def load_weights(model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True) -> dict[str, str]:
    """Load safetensors weights into ``model``; errors name the file and the mismatching tensors."""
    path = Path(path)
    with _open_weights(path) as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    _check_match(path, {k: tuple(v.shape) for k, v in model.state_dict().items()},
                 {k: tuple(t.shape) for k, t in tensors.items()}, strict)
    model.load_state_dict(tensors, strict=strict)
    return meta


class _SkipInit(TorchFunctionMode):
    """Turns the in-place initialisers into no-ops while the meta model is built: every tensor is then
    overwritten from the checkpoint, and running them on meta tensors would import torch's Python
    decompositions (~70 MB resident, as much as a small model)."""

    INIT = frozenset({"normal_", "uniform_", "zero_", "fill_", "kaiming_uniform_", "trunc_normal_", "ones_", "zeros_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.INIT:
            return next(a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


def materialise(cfg: ModelConfig, fill: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
                ) -> MoETransformer:
    """Build the model on the meta device, then give every tensor its real storage from ``fill(meta_state)``:
    peak memory stays near the size of the weights. Returns the model in eval mode."""
    from moekit.nn.transformer import MoETransformer

    with torch.device("meta"), _SkipInit():
        model = MoETransformer(cfg)
    model.load_state_dict(fill(model.state_dict()), strict=True, assign=True)
    return model.eval()
