"""Stack per-request KV caches into one left-padded batch cache, and split it back.

Legend: B running requests, Hk kv heads (1 for MLA's latent), L cached length, d head dim.

Each request owns a :class:`KVCache` of batch 1 while it waits or runs alone. To decode several
requests in one forward their caches are left-padded to the longest and stacked along B; the model
reads ``cache.mask`` (B, L) as the key padding mask and counts RoPE positions over real keys only, so a
padded row computes what it would alone (up to the reduction order of batched kernels). A step that
carries a prefill chunk leaves masked holes in the decode rows (their padded inputs); they are harmless
(masked, not counted as positions) and dropped at the next split. When the set of running requests
changes, the batch cache is split back into per-request caches and re-stacked.
"""
from __future__ import annotations

import torch
from torch import Tensor

from moekit.nn.attention import KVCache

__all__ = ["empty_like", "split_batch", "stack_caches", "step_inputs"]


def _pad_left(t_1HLd: Tensor, pad: int) -> Tensor:
    if pad == 0:
        return t_1HLd
    zeros = t_1HLd.new_zeros(t_1HLd.shape[0], t_1HLd.shape[1], pad, *t_1HLd.shape[3:])
    return torch.cat([zeros, t_1HLd], dim=2)


def stack_caches(caches: list[KVCache]) -> tuple[KVCache, list[int]]:
    """One batch cache of the given batch-1 caches (in order) and each row's left padding.

    With equal lengths the mask stays None: a single request then runs exactly the forward it runs in
    ``moekit.infer.generate`` (no mask, the same kernels), which greedy identity depends on.
    """
    if len(caches) == 1:
        return caches[0], [0]
    lengths = [c.length for c in caches]
    L = max(lengths)
    pads = [L - n for n in lengths]
    n_layers = len(caches[0].k)
    out = KVCache(n_layers)
    for layer in range(n_layers):
        out.k[layer] = torch.cat([_pad_left(c.k[layer], p) for c, p in zip(caches, pads)], dim=0)
        out.v[layer] = torch.cat([_pad_left(c.v[layer], p) for c, p in zip(caches, pads)], dim=0)
    if any(pads) or any(c.mask is not None for c in caches):
        mask_BL = torch.ones(len(caches), L, dtype=torch.bool)
        for i, p in enumerate(pads):
            mask_BL[i, :p] = False
        out.mask = mask_BL
    return out, pads


def split_batch(batch: KVCache, pads: list[int]) -> list[KVCache]:
    """The batch-1 cache of each row, mask None: its left padding removed (a view, no copy), and the
    holes that padded chunks left after it (masked positions past the padding) dropped (a copy)."""
    if len(pads) == 1 and batch.mask is None:
        return [batch]
    out = []
    for i, p in enumerate(pads):
        c = KVCache(len(batch.k))
        real_L = None if batch.mask is None else batch.mask[i, p:]
        if real_L is None or bool(real_L.all()):
            c.k = [k[i:i + 1, :, p:] for k in batch.k]
            c.v = [v[i:i + 1, :, p:] for v in batch.v]
        else:
            keep = real_L.nonzero().squeeze(1) + p
            c.k = [k[i:i + 1].index_select(2, keep) for k in batch.k]
            c.v = [v[i:i + 1].index_select(2, keep) for v in batch.v]
        out.append(c)
    return out


def empty_like(ref: KVCache) -> KVCache:
    """An empty batch-1 cache of zero-length tensors shaped like ``ref``'s, so that it can be stacked."""
    out = KVCache(len(ref.k))
    out.k = [t.new_empty(1, t.shape[1], 0, *t.shape[3:]) for t in ref.k]
    out.v = [t.new_empty(1, t.shape[1], 0, *t.shape[3:]) for t in ref.v]
    return out


def step_inputs(pending: list[int], chunk: list[int] | None) -> tuple[Tensor, Tensor | None]:
    """(ids (B, n), mask or None) of a batched decode step: each decode row's pending token, left-padded to
    the length n of a prefill ``chunk`` that rides along as the last row (n = 1 without one)."""
    if chunk is None:
        return torch.tensor([[t] for t in pending]), None
    n = len(chunk)
    ids = torch.zeros(len(pending) + 1, n, dtype=torch.long)
    mask = torch.zeros(len(pending) + 1, n, dtype=torch.long)
    ids[:-1, -1] = torch.tensor(pending)
    mask[:-1, -1] = 1
    ids[-1] = torch.tensor(chunk)
    mask[-1] = 1
    return ids, mask
