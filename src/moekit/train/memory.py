"""How much memory a training run needs, estimated before it starts, so that an impossible run is refused
with the number instead of being killed by the OOM killer mid-step.

Counted in bytes (fp32, the trainer's dtype), for N = rows x seq_len tokens of one micro-batch:
  weights, gradients, AdamW's two moments      4 x 4 bytes per parameter
  per block, saved for the backward            N x (9 D + 3 E + k (3 D + 3 H)) floats for an MoE block
                                               (norms, q/k/v/out, residuals; router scores; the routed
                                               rows, their gate/up/activation), N x (9 D + 3 H_dense)
                                               for a dense one (attention runs flash-style: no T x T)
  logits                                       3 x N x vocab floats (logits, log-softmax, their gradient)
times 1.3 for the backward's temporaries (measured: the peak is 1.1-1.35x the saved tensors on the
default model at three batch shapes). ``tests/train/test_memory_estimate.py`` holds it against a
measured peak.
"""
from __future__ import annotations

from dataclasses import dataclass

from moekit.config import ModelConfig, TrainConfig

__all__ = ["MemoryEstimate", "available_bytes", "check_fits", "estimate_training_memory"]

_F32 = 4
_TRANSIENT = 1.3


@dataclass(frozen=True)
class MemoryEstimate:
    params: int  # parameter count
    state_bytes: int  # weights + gradients + optimizer moments
    activation_bytes: int  # saved for the backward, all blocks
    logits_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes + self.logits_bytes


def _params(m: ModelConfig) -> int:
    """A parameter count close enough for memory (exact counts: moekit spec)."""
    d, v, moe = m.d_model, m.vocab_size, m.moe
    attn = 2 * d * d + 2 * d * (m.n_kv_heads or m.n_heads) * (d // m.n_heads)
    moe_ffn = moe.num_experts * 3 * d * moe.d_hidden + moe.num_experts * d + 3 * d * moe.shared_hidden_total
    dense_ffn = 3 * d * m.dense_hidden
    blocks = sum(attn + (moe_ffn if m.is_moe_layer(i) else dense_ffn) for i in range(m.n_layers))
    return blocks + v * d * (1 if m.tie_embeddings else 2)


def estimate_training_memory(m: ModelConfig, t: TrainConfig) -> MemoryEstimate:
    rows = t.batch_size // getattr(t, "grad_accum", 1)
    n = rows * t.seq_len
    d, moe = m.d_model, m.moe
    per_moe = n * (9 * d + 3 * moe.num_experts + moe.top_k * (3 * d + 3 * moe.d_hidden)
                   + 3 * moe.shared_hidden_total)
    per_dense = n * (9 * d + 3 * m.dense_hidden)
    acts = sum(per_moe if m.is_moe_layer(i) else per_dense for i in range(m.n_layers)) * _F32
    p = _params(m)
    return MemoryEstimate(p, 4 * _F32 * p, int(_TRANSIENT * acts), int(_TRANSIENT * 3 * n * m.vocab_size * _F32))


def check_fits(m: ModelConfig, t: TrainConfig) -> None:
    """ValueError when the run cannot fit in the memory this machine has available now."""
    avail = available_bytes()
    est = estimate_training_memory(m, t)
    if avail is None or est.total_bytes <= avail:
        return
    gib = 2 ** 30
    raise ValueError(
        f"this run needs about {est.total_bytes / gib:.1f} GiB (activations {est.activation_bytes / gib:.1f}, "
        f"logits {est.logits_bytes / gib:.1f}, weights + optimizer {est.state_bytes / gib:.1f}) for "
        f"--batch-size {t.batch_size} x --seq-len {t.seq_len}, and {avail / gib:.1f} GiB is available: "
        "lower --batch-size or --seq-len (or split the batch with --grad-accum)")


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), or None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
