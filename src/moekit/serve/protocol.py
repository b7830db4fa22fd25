"""OpenAI-compatible request and response shapes (typed, validated), separate from the engine.

Requests are validated here (types, ranges); what depends on the model (context length, the model's
name, a chat template) is checked by the app. Unknown fields are ignored, as OpenAI's API does for
fields a server does not implement; fields whose non-default values moekit cannot honour (n > 1,
logprobs, echo, several prompts) are refused rather than silently dropped.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "ErrorResponse", "StreamOptions",
           "chat_chunk", "chat_response", "completion_chunk", "completion_response", "error_body",
           "model_list", "new_id"]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM convention: -1 or 0 = no limit
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request (send n requests for n choices)")
    logprobs: Any = None
    return_token_ids: bool = False  # moekit extension (as vLLM's): each choice / chunk lists its token ids
    ignore_eos: bool = False  # moekit extension (as vLLM's): run to max_tokens past the end-of-document token

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop strings")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v not in (None, False, 0):
            raise ValueError("logprobs are not supported by moekit serve")
        return v

    def stop_list(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def top_k_or_none(self) -> int | None:
        return None if self.top_k in (None, -1, 0) else self.top_k


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("one prompt per request: send several requests for several prompts")
            v = v[0]
        if len(v) == 0:
            raise ValueError("the prompt is empty")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported by moekit serve")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for p in self.content:
                if p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise ValueError("only text content parts are supported")
                parts.append(p["text"])
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class ErrorResponse(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": ErrorResponse(message=message, type=type_, param=param, code=code).model_dump()}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_response(rid: str, model: str, text: str, finish: str, prompt: int, completion: int,
                        token_ids: list[int] | None = None) -> dict:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": _usage(prompt, completion)}


def completion_chunk(rid: str, model: str, text: str | None, finish: str | None,
                     usage: tuple[int, int] | None = None, token_ids: list[int] | None = None) -> dict:
    choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    if token_ids is not None and choices:
        choices[0]["token_ids"] = token_ids
    out = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
           "choices": choices}
    if usage is not None:
        out["usage"] = _usage(*usage)
    return out


def chat_response(rid: str, model: str, text: str, finish: str, prompt: int, completion: int,
                  token_ids: list[int] | None = None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": _usage(prompt, completion)}


def chat_chunk(rid: str, model: str, delta: dict | None, finish: str | None,
               usage: tuple[int, int] | None = None, token_ids: list[int] | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    if token_ids is not None and choices:
        choices[0]["token_ids"] = token_ids
    out = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": choices}
    if usage is not None:
        out["usage"] = _usage(*usage)
    return out


def model_list(name: str, max_len: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                        "owned_by": "moekit", "max_model_len": max_len}]}
