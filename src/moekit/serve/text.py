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
    """Text of the generated ids so far; ``push`` returns (new text to emit, stopped).

    Detokenized incrementally, as vLLM and TGI do: each push decodes only the ids since the last complete
    character, with the piece before them as context (``decode(ids[prefix:])`` minus
    ``decode(ids[prefix:read])``), so a token costs the same at position 10 as at position 10,000 and a
    decoder that treats a window's first token specially (a SentencePiece leading space) does so only to
    the context. The text equals decoding all the ids at once (``tests/serve/test_stop_text.py``)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._longest = max((len(s) for s in self._stop), default=0)
        self.ids: list[int] = []
        self._prefix = self._read = 0  # ids[prefix:read]: the context; ids[read:]: not yet in ``_decoded``
        self._decoded = ""  # the text of ids[:read], complete characters only
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

    def _advance(self, final: bool) -> str:
        """The text of every id so far: ``_decoded`` plus the new ids' piece once it ends in a complete
        character (or, ``final``, whatever it is)."""
        context = self._decode(self.ids[self._prefix:self._read]) if self._read > self._prefix else ""
        window = self._decode(self.ids[self._prefix:])
        if len(window) > len(context) and (final or not window.endswith("\ufffd")):
            self._decoded += window[len(context):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._decoded

    def push(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(token_id)
        text = self._advance(final=False)
        # 1. a stop string ends the text before it (searched from where it could first start)
        start = max(0, len(self.emitted) - self._longest)
        hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            return self._delta(self.text), True
        # 2. hold back a possible start of a stop string (an incomplete character is not in ``text`` yet)
        return self._delta(text[: len(text) - self._holdback(text)]), False

    def flush(self) -> str:
        """The rest of the text at the end of generation (nothing is held back any more)."""
        self.text = self._advance(final=True)
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
