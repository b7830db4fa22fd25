"""How a compressed model compares with its source: perplexity, KL, top-1 agreement, decode speed.

Legend: B batch, S sequence, V vocabulary.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["compare_models", "decode_tokens_per_s", "perplexity"]


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    """exp(token-weighted mean next-token loss) over (input_ids, labels) batches."""
    total, count = 0.0, 0
    for x, y in batches:
        total += float(model(x, labels=y).loss) * y.numel()
        count += y.numel()
    return math.exp(total / max(1, count))


@torch.no_grad()
def compare_models(ref: nn.Module, other: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """Mean KL(ref || other) in nats per token, top-1 agreement, both perplexities, over the same batches."""
    kl = agree = loss_r = loss_o = 0.0
    n = 0
    for x, y in batches:
        lr_BSV = ref(x).logits.double().log_softmax(-1)
        lo_BSV = other(x).logits.double().log_softmax(-1)
        kl += float((lr_BSV.exp() * (lr_BSV - lo_BSV)).sum(-1).sum())
        agree += float((lr_BSV.argmax(-1) == lo_BSV.argmax(-1)).sum())
        loss_r += float(-lr_BSV.gather(-1, y[..., None]).sum())
        loss_o += float(-lo_BSV.gather(-1, y[..., None]).sum())
        n += y.numel()
    return {"kl_mean": kl / n, "top1_agreement": agree / n, "ppl_ref": math.exp(loss_r / n),
            "ppl": math.exp(loss_o / n), "ppl_change": math.exp((loss_o - loss_r) / n) - 1, "tokens": n}


@torch.no_grad()
def decode_tokens_per_s(model: nn.Module, prompt: Tensor, new_tokens: int = 64, repeats: int = 3) -> float:
    """Greedy batch-1 decoding with the KV cache: the best of ``repeats`` runs, new tokens per second."""
    from moekit.infer.generate import generate

    model.eval()
    generate(model, prompt, 4, temperature=0.0)  # warm-up
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = generate(model, prompt, new_tokens, temperature=0.0)
        best = max(best, (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - t0))
    return best
