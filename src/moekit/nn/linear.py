"""``nn.Linear`` whose one-row calls on a large weight take :func:`moekit.ops.gemv.linear`'s streaming kernel.

Same parameters, state-dict keys and initialisation as ``nn.Linear`` (it is one, by subclassing), so
checkpoints, quantization and Hugging Face loading see no difference; training and batched calls run
``F.linear`` as before.
"""
from __future__ import annotations

from torch import Tensor, nn

from moekit.ops.gemv import linear

__all__ = ["Linear"]


class Linear(nn.Linear):
    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Linear's argument name
        return linear(input, self.weight, self.bias)
