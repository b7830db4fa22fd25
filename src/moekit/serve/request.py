"""What a request to the serving engine is made of and what comes back: ``SamplingParams`` (what one
request asks for), ``Event`` (what its sink receives), the checks every engine makes before it queues one."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EngineStopped", "Event", "SamplingParams", "check_request"]


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks for. temperature 0 is greedy; seed None draws a random seed."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1")


@dataclass
class Event:
    """``token`` (text may be empty while a character or a possible stop string is incomplete),
    ``finish`` (finish_reason "stop" | "length" | "abort"), or ``error`` (message)."""

    kind: str
    text: str = ""
    token_id: int | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    message: str = ""


def check_request(prompt_ids: list[int], params: SamplingParams, max_seq_len: int) -> None:
    """ValueError for a request no engine can serve: an empty prompt, or one that does not fit the context."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_ids) + params.max_tokens > max_seq_len:
        raise ValueError(f"prompt tokens {len(prompt_ids)} + max_tokens {params.max_tokens} exceed the "
                         f"model's context of {max_seq_len} tokens")


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new requests."""
