"""Text around the token stream: incremental detokenization with stop strings, and chat templates.

``StopText`` turns a growing list of token ids into text deltas: it holds back an incomplete UTF-8
tail (a byte-level BPE splits characters across tokens) and any tail that could still become a stop
string, so a stop string is never streamed and then taken back. ``ChatTemplate`` renders a model's
Hugging Face ``chat_template`` (tokenizer_config.json) with a sandboxed jinja2, as transformers does.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ChatTemplate", "StopText", "TemplateError"]


class StopText:
    """Text of the generated ids so far; ``push`` returns (new text to emit, stopped)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self._stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = ""  # text already handed out
        self.text = ""  # the final text once stopped or flushed

    def _holdback(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def push(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(token_id)
        text = self._decode(self.ids)
        # 1. a stop string ends the text before it (searched from where it could first start)
        start = max(0, len(self.emitted) - max((len(s) for s in self._stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            return self._delta(self.text), True
        # 2. hold back an incomplete character and a possible start of a stop string
        safe = text[: len(text) - self._holdback(text)]
        while safe.endswith("\ufffd"):
            safe = safe[:-1]
        return self._delta(safe), False

    def flush(self) -> str:
        """The rest of the text at the end of generation (nothing is held back any more)."""
        self.text = self._decode(self.ids)
        return self._delta(self.text)

    def _delta(self, text: str) -> str:
        if len(text) <= len(self.emitted):
            return ""
        out = text[len(self.emitted):]
        self.emitted = text
        return out


class TemplateError(ValueError):
    """The model has no chat template, or the template refused the messages."""


class ChatTemplate:
    """A model directory's chat template (``chat_template`` of tokenizer_config.json, or a
    chat_template.jinja file), or none. ``render(messages)`` -> the prompt text."""

    def __init__(self, source: str | None, special: dict[str, str] | None = None):
        self.source = source
        self._special = special or {}
        self._compiled = None

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTemplate:
        path = Path(path)
        cfg: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        src = cfg.get("chat_template")
        if isinstance(src, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in src if isinstance(t, dict)}
            src = named.get("default") or next(iter(named.values()), None)
        if src is None and (path / "chat_template.jinja").is_file():
            src = (path / "chat_template.jinja").read_text()

        def token(v):
            return v.get("content") if isinstance(v, dict) else v

        special = {k: token(cfg[k]) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                   if isinstance(token(cfg.get(k)), str)}
        return cls(src if isinstance(src, str) else None, special)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self.source is None:
            raise TemplateError("this model has no chat template (no \"chat_template\" in its "
                                "tokenizer_config.json): use /v1/completions with a prompt instead")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if self._compiled is None:
            def raise_exception(message):
                raise TemplateError(f"the chat template refused the messages: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            env.filters["tojson"] = lambda v, indent=None: json.dumps(v, indent=indent, ensure_ascii=False)
            try:
                self._compiled = env.from_string(self.source)
            except jinja2.TemplateError as e:
                raise TemplateError(f"the model's chat template does not compile: {e}") from e
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._special)
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template failed on these messages: {e}") from e
