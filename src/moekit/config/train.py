"""TrainConfig (one training run) and ParallelConfig (how many processes, how experts are split)."""
from __future__ import annotations

from dataclasses import dataclass

from moekit.config.base import ConfigBase, setting

__all__ = ["ParallelConfig", "TrainConfig"]

DTYPES = ("float32", "bfloat16", "float16")  # the names moekit.parallel.fsdp maps to torch dtypes


@dataclass(frozen=True)
class TrainConfig(ConfigBase):
    """Training-run configuration; ``moekit train`` generates a flag per field (``--batch-size``)."""

    kind = "training"

    steps: int = setting(3000, "optimizer steps to train for")
    batch_size: int = setting(16, "sequences per step")
    seq_len: int = setting(128, "tokens per sequence")
    lr: float = setting(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = setting(0.1, "the cosine schedule decays to lr * min_lr_ratio")
    warmup_steps: int = setting(30, "steps of linear learning-rate warm-up")
    schedule_steps: int | None = setting(None, "the step at which the cosine reaches its floor (lr stays "
                                         "there after); none = --steps. A --resume keeps the run's own "
                                         "(moekit train --resume ... --extend-schedule stretches it)")
    weight_decay: float = setting(0.1, "AdamW weight decay")
    grad_clip: float = setting(1.0, "clip the gradient norm to this; 0 = no clipping")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    eval_interval: int = setting(100, "validate every this many steps (and at the last)")
    eval_batches: int = setting(16, "validation batches per evaluation")
    ckpt_interval: int = setting(100, "checkpoint every this many steps (and at the last)")
    keep_checkpoints: int = setting(2, "checkpoints kept on disk, the latest included (older ones under "
                                    "checkpoints/step-S, or checkpoints/dcp-step-S for a distributed run: "
                                    "resume one with --from-step S)")
    log_every: int = setting(1, "write a metrics line every this many steps")
    seed: int = setting(0, "seed of the model init, data order and routing noise")
    data: str | None = setting(None, "training text: a file, a folder of files or a .jsonl of "
                               "{\"text\": ...}; none = the running Python's standard library sources",
                               metavar="PATH")
    vocab_size: int = setting(4096, "vocabulary size of the BPE tokenizer trained on the data")
    max_data_bytes: int = setting(16_000_000, "read at most this many bytes of data")
    threads: int | None = setting(None, "CPU threads for torch; none = torch's default")
    compile: bool = setting(False, "torch.compile the model (inductor): ~25 s to compile, ~7% faster steps")
    grad_accum: int = setting(1, "micro-batches per optimizer step: the batch_size rows of a step are run "
                              "in this many forward/backward passes (activations of batch_size / grad_accum "
                              "rows), the loss and update those of the whole batch")
    activation_checkpointing: bool = setting(False, "recompute each block's activations in the backward "
                                             "instead of keeping them (less memory, ~1 more forward)")
    # collapse detection (see moekit.analysis)
    dead_threshold: float = setting(0.02, "collapse: an expert below this share of its layer's "
                                    "assignments ...")
    hot_threshold: float = setting(0.6, "collapse: ... or one expert above this share ...")
    collapse_window: int = setting(50, "collapse: ... for this many consecutive steps is flagged")
    fail_on_collapse: bool = setting(False, "stop the run with an error (after a checkpoint) when routing "
                                     "collapses")

    @property
    def schedule_end(self) -> int:
        """The step at which the learning rate reaches lr * min_lr_ratio."""
        return self.schedule_steps or self.steps

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
        if self.schedule_steps is not None and (not isinstance(self.schedule_steps, int)
                                                or self.schedule_steps < 1):
            raise ValueError(f"schedule_steps={self.schedule_steps!r} must be an integer >= 1 (or none = steps)")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("warmup_steps, weight_decay and grad_clip must be >= 0")
        if isinstance(self.grad_accum, bool) or not isinstance(self.grad_accum, int) or self.grad_accum < 1 \
                or self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum={self.grad_accum!r} must be an integer >= 1 dividing "
                             f"batch_size={self.batch_size} (each micro-batch has batch_size / grad_accum rows)")


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
    fsdp: bool = setting(True, "shard parameters, gradients and optimizer state with FSDP2 (experts over the "
                         "data-parallel ranks holding them); off = every rank keeps a full replica and "
                         "gradients are all-reduced after backward")
    param_dtype: str | None = setting(None, "FSDP mixed precision: the dtype parameters are gathered and "
                                      "computed in (float32, bfloat16, float16); master weights and the "
                                      "optimizer stay float32; none = float32 throughout", metavar="DTYPE")
    reduce_dtype: str | None = setting(None, "FSDP mixed precision: the dtype gradients are reduced in; "
                                       "none = param_dtype", metavar="DTYPE")
    nnodes: int = setting(1, "machines of a --nproc run (torchrun --nnodes); > 1 needs --rdzv-endpoint")
    node_rank: int = setting(0, "this machine's index in [0, nnodes) (torchrun --node-rank)")
    rdzv_endpoint: str | None = setting(None, "HOST:PORT of torchrun's c10d rendezvous, reachable from every "
                                        "node (usually node 0's address)", metavar="HOST:PORT")

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
        for name in ("param_dtype", "reduce_dtype"):
            v = getattr(self, name)
            if v is not None and v not in DTYPES:
                raise ValueError(f"{name}={v!r} is unknown; choose one of {DTYPES} (or none)")
            if v is not None and not self.fsdp:
                raise ValueError(f"{name}={v!r} is FSDP's mixed-precision policy: it needs fsdp on")
        self._check_nodes()

    def _check_nodes(self) -> None:
        if isinstance(self.nnodes, bool) or not isinstance(self.nnodes, int) or self.nnodes < 1:
            raise ValueError(f"nnodes={self.nnodes!r} must be an integer >= 1")
        if not isinstance(self.node_rank, int) or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank={self.node_rank!r} must be in [0, nnodes={self.nnodes})")
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(f"nnodes={self.nnodes} needs rdzv_endpoint=HOST:PORT (--rdzv-endpoint), the "
                             "rendezvous every node joins (usually node 0's address and a free port)")
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"rdzv_endpoint={self.rdzv_endpoint!r} must be HOST:PORT")
        if (self.nnodes > 1 or self.rdzv_endpoint is not None) and self.nproc is None:
            raise ValueError(f"nnodes={self.nnodes} / rdzv_endpoint: moekit launches torchrun on each node only "
                             "with nproc (--nproc N processes per node)")
        if self.nproc is not None and (self.nproc * self.nnodes) % self.ep:
            raise ValueError(f"ep={self.ep} must divide the world size nproc x nnodes = "
                             f"{self.nproc} x {self.nnodes} = {self.nproc * self.nnodes}")
