"""TrainConfig (one training run) and ParallelConfig (how many processes, how experts are split)."""
from __future__ import annotations

from dataclasses import dataclass

from moekit.config.base import ConfigBase, setting

__all__ = ["ParallelConfig", "TrainConfig"]


@dataclass(frozen=True)
class TrainConfig(ConfigBase):
    """Training-run configuration; ``moekit train`` generates a flag per field (``--batch-size``)."""

    kind = "training"

    steps: int = setting(1500, "optimizer steps to train for")
    batch_size: int = setting(16, "sequences per step")
    seq_len: int = setting(128, "tokens per sequence")
    lr: float = setting(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = setting(0.1, "the cosine schedule decays to lr * min_lr_ratio")
    warmup_steps: int = setting(30, "steps of linear learning-rate warm-up")
    weight_decay: float = setting(0.1, "AdamW weight decay")
    grad_clip: float = setting(1.0, "clip the gradient norm to this; 0 = no clipping")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    eval_interval: int = setting(100, "validate every this many steps (and at the last)")
    eval_batches: int = setting(16, "validation batches per evaluation")
    ckpt_interval: int = setting(100, "checkpoint every this many steps (and at the last)")
    keep_checkpoints: int = setting(2, "checkpoints kept on disk, the latest included (older ones under "
                                    "checkpoints/step-S: resume one with --from-step S)")
    log_every: int = setting(1, "write a metrics line every this many steps")
    seed: int = setting(0, "seed of the model init, data order and routing noise")
    data: str | None = setting(None, "training text: a file, a folder of files or a .jsonl of "
                               "{\"text\": ...}; none = the running Python's standard library sources",
                               metavar="PATH")
    vocab_size: int = setting(4096, "vocabulary size of the BPE tokenizer trained on the data")
    max_data_bytes: int = setting(16_000_000, "read at most this many bytes of data")
    threads: int | None = setting(None, "CPU threads for torch; none = torch's default")
    compile: bool = setting(False, "torch.compile the model (inductor): ~25 s to compile, ~7% faster steps")
    # collapse detection (see moekit.analysis)
    dead_threshold: float = setting(0.02, "collapse: an expert below this share of its layer's "
                                    "assignments ...")
    hot_threshold: float = setting(0.6, "collapse: ... or one expert above this share ...")
    collapse_window: int = setting(50, "collapse: ... for this many consecutive steps is flagged")
    fail_on_collapse: bool = setting(False, "stop the run with an error (after a checkpoint) when routing "
                                     "collapses")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_interval", "eval_batches", "ckpt_interval",
                     "log_every", "vocab_size", "collapse_window", "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("warmup_steps, weight_decay and grad_clip must be >= 0")


@dataclass(frozen=True)
class ParallelConfig(ConfigBase):
    """How a run is spread over processes: expert parallel x data parallel. Sizes only; the process
    groups themselves are built by ``moekit.parallel`` and passed in."""

    kind = "parallel"

    ep: int = setting(1, "expert-parallel size: each MoE layer's experts split over this many ranks; the "
                      "rest of the world is data parallel")
    nproc: int | None = setting(None, "processes moekit launches on this machine (torchrun underneath; CPU: "
                                "gloo); none = not launched by moekit: one process, or torchrun's")
    dist_timeout: float = setting(300.0, "seconds a collective waits for a silent rank")

    def __post_init__(self) -> None:
        if not isinstance(self.ep, int) or isinstance(self.ep, bool) or self.ep < 1:
            raise ValueError(f"ep={self.ep!r} must be an integer >= 1")
        if self.nproc is not None and (not isinstance(self.nproc, int) or isinstance(self.nproc, bool)
                                       or self.nproc < 1):
            raise ValueError(f"nproc={self.nproc!r} must be an integer >= 1 "
                             "(or None = not launched by moekit)")
        if isinstance(self.dist_timeout, bool) or not isinstance(self.dist_timeout, (int, float)) \
                or not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout={self.dist_timeout!r} must be > 0 (seconds)")
