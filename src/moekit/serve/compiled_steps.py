"""Requests that decode alone (one running, or ``--deterministic``) through the compiled decode step.

Each such request moves its eager KV cache into a static one of the whole context once
(:class:`moekit.infer.CompiledDecoder`, compiled when the engine starts, before the server reports ready)
and steps there; when it has to join a batch, its positions go back into an eager cache (views, no copy).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moekit.infer.compiled import CompiledDecoder

__all__ = ["CompiledSteps"]


class CompiledSteps:
    def __init__(self, model: Any, max_seq_len: int):
        self.decoder = CompiledDecoder(model)
        self.max_seq_len = max_seq_len
        with torch.inference_mode():  # as the engine thread decodes
            self.compile_s = self.decoder.warm_up(1, max_seq_len)

    def step(self, seq: Any, ids_11: Tensor, layers: list[int] | None,
             count: Callable[[np.ndarray | None], None]) -> Tensor:
        """Logits (1, V) of one step of ``seq`` (its eager ``cache`` becomes its static ``state`` at the
        first); ``count`` gets the step's (L, E) expert counts of ``layers`` (None without layers)."""
        if seq.state is None:
            seq.state, seq.cache = self.decoder.start(seq.cache, seq.cache.mask, self.max_seq_len), None
        logits_1V, counts = self.decoder.step(ids_11, seq.state)
        count(None if not layers else torch.stack([counts[i] for i in layers]).numpy())
        return logits_1V

    def to_eager(self, seqs: list[Any]) -> None:
        """Give the requests that stepped here an eager cache again, to be stacked into a batch."""
        for seq in seqs:
            if seq.state is not None:
                seq.cache, seq.state = self.decoder.to_cache(seq.state), None
