"""Activation checkpointing, per transformer block: keep each block's input, recompute its inside.

The block's own ``forward`` is replaced on the instance (not wrapped in another module), so parameter
names, state dicts and checkpoints stay those of the plain model, and FSDP's per-block hooks (which run
around ``forward``) still gather the block's parameters before its backward recomputes it.

Non-reentrant ``torch.utils.checkpoint``: the block returns ``(x, MoEOutput)``, not only tensors, and the
recompute replays torch's RNG (router noise draws the same). In an expert-parallel layer the recompute
repeats the forward all-to-alls, in the same order on every rank (backward runs the blocks in reverse
everywhere); the communication meter counts them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpoint_blocks", "saved_activation_bytes"]


def checkpoint_blocks(model: nn.Module) -> int:
    """Checkpoint every block of ``model.layers``; returns how many. Idempotent."""
    n = 0
    for block in model.layers:
        if getattr(block, "_moekit_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():  # eval / generation: nothing is saved anyway
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block._moekit_checkpointed = True
        n += 1
    return n


class saved_activation_bytes:  # noqa: N801 - used as a context manager, like torch's own hooks
    """Bytes of the tensors autograd saves for backward inside the ``with`` (a measure of activation memory;
    parameters saved by reference are counted too, the same in both modes)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes += t.numel() * t.element_size()
        return t

    def __enter__(self) -> saved_activation_bytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
