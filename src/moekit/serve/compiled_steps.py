"""The compiled decode steps of ``moekit serve --compile`` (compiled when the engine starts, before the server
reports ready).

:class:`CompiledRows` (the default): every running request decodes in a row of
:class:`moekit.infer.DecodeRows`, one compiled forward for the whole batch, alone or not. A request's eager
prefill cache is copied into a free row when it starts decoding; when it leaves, the last row moves into
its place; a prompt that arrives while others decode is prefilled compiled too, a chunk per step, in the
staging row. :class:`CompiledSteps` (``--deterministic``): each request steps alone in a static cache of its
own (:class:`moekit.infer.CompiledDecoder`), the forward ``generate --compile`` runs.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moekit.infer.compiled import CompiledDecoder
from moekit.infer.rows import DecodeRows

__all__ = ["CompiledRows", "CompiledSteps", "counts_to_host"]

Count = Callable[[np.ndarray | None], None]


def counts_to_host(counts: dict[int, Tensor], layers: list[int] | None) -> np.ndarray | None:
    """A compiled step's {MoE layer: (E,) counts} as the (L, E) host array the expert window takes (None
    without layers): the only metrics work a compiled step leaves on the host, besides the window's add."""
    return None if not layers else torch.stack([counts[i] for i in layers]).numpy()


class CompiledSteps:
    def __init__(self, model: Any, max_seq_len: int):
        self.decoder = CompiledDecoder(model)
        self.max_seq_len = max_seq_len
        with torch.inference_mode():  # as the engine thread decodes
            self.compile_s = self.decoder.warm_up(1, max_seq_len)

    def step(self, seq: Any, ids_11: Tensor, layers: list[int] | None, count: Count) -> Tensor:
        """Logits (1, V) of one step of ``seq`` (its eager ``cache`` becomes its static ``state`` at the
        first); ``count`` gets the step's (L, E) expert counts of ``layers`` (None without layers)."""
        if seq.state is None:
            seq.state, seq.cache = self.decoder.start(seq.cache, seq.cache.mask, self.max_seq_len), None
        logits_1V, counts = self.decoder.step(ids_11, seq.state)
        count(counts_to_host(counts, layers))
        return logits_1V


class CompiledRows:
    """The running batch in the rows of a :class:`DecodeRows` of ``max_batch`` rows; ``members[i]`` decodes
    in row i."""

    def __init__(self, model: Any, max_batch: int, chunk: int = 0):
        self.rows = DecodeRows(model, max_batch, chunk)
        with torch.inference_mode():
            self.compile_s = self.rows.warm_up()
        self.members: list[Any] = []
        self._staging: Any = None  # the request whose prompt is in the staging row

    def stages(self, seq: Any, others_decoding: bool) -> bool:
        """Whether ``seq``'s prompt goes through the compiled chunk (the staging row): one that arrives while
        others decode, or one already on its way there. A request alone is prefilled as ``generate`` does,
        eagerly in one forward."""
        return self.rows.chunk > 0 and (seq is self._staging or (others_decoding and seq.prefilled == 0))

    def prefill(self, seq: Any, ids: list[int], layers: list[int] | None, count: Count) -> Tensor:
        """Logits (1, V) after the last of ``ids``, the next prompt tokens of ``seq``, fed a chunk a call."""
        if seq is not self._staging:
            self.rows.drop_staged()
            self._staging = seq
        for i in range(0, len(ids), self.rows.chunk):
            logits_1V, counts = self.rows.stage(torch.tensor(ids[i:i + self.rows.chunk]))
            count(counts_to_host(counts, layers))
        return logits_1V

    def step(self, seqs: list[Any], layers: list[int] | None, count: Count) -> dict[Any, Tensor]:
        """{seq: logits (1, V)} of one step of every running request (``seq.pending`` fed): those no longer
        in ``seqs`` leave their rows first, new ones (``seq.cache`` their prefill) take free rows."""
        running = set(seqs)
        for row in reversed(range(len(self.members))):
            if self.members[row] not in running:
                if self.rows.release(row) is not None:
                    self.members[row] = self.members[-1]
                self.members.pop()
        for seq in seqs:
            if seq is self._staging:  # its prompt is staged, all of it (it runs)
                self.rows.admit_staged()
                self._staging = None
                self.members.append(seq)
            elif seq.cache is not None:  # prefilled eagerly since the last step
                self.rows.admit(seq.cache)
                seq.cache = None
                self.members.append(seq)
        ids_n1 = torch.tensor([[s.pending] for s in self.members])
        logits_nV, counts = self.rows.step(ids_n1)
        count(counts_to_host(counts, layers))
        return {seq: logits_nV[i:i + 1] for i, seq in enumerate(self.members)}

    def evict(self) -> None:
        """Every member back to an eager cache of its own (copies: the rows will be reused), rows emptied."""
        for row, seq in enumerate(self.members):
            own = self.rows.to_cache(row)
            own.k, own.v = [t.clone() for t in own.k], [t.clone() for t in own.v]
            seq.cache = own
        self.members.clear()
        self.rows.clear()
