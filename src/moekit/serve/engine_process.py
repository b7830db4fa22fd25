"""The engine in a process of its own, behind the :class:`~moekit.serve.engine.Engine`'s interface.

``moekit serve`` decodes in a child process: the HTTP side's per-token Python (the event loop, parsing,
server-sent-event chunks) then never holds the interpreter lock the decode loop needs. In one process a
probe of 200 us of Python per token on another thread raised the engine's inter-token latency from 2.71
to 3.30 ms; vLLM's V1 engine splits the same way. The child loads the model itself (nothing large crosses
the pipe) and runs the ordinary Engine; the parent keeps the tokenizer (to encode prompts) and observes
the request metrics from the events as they arrive.

Messages are pickled tuples over two ``multiprocessing`` pipes whose both ends are this module:
- parent -> child: ``("submit", id, prompt_ids, params)``, ``("abort", id)``, ``("call", n, what)``
  (``what``: "queue", "experts", "cache"), ``("stop", grace_s)``;
- child -> parent: ``("ready", info)`` or ``("fatal", type name, message)`` once, then ``("events",
  [(id, text, token id) | (id, Event), ...])`` (one engine step's events, in one write: a pipe write that
  wakes the reader costs 20-35 us here, so a step of B requests pays it once; a token event crosses as a
  plain tuple), ``("event", id, Event)`` (a request refused before it reached the engine), ``("reply", n,
  value)``, and ``("stopped",)`` last.
The child pickles with the plain pickler (``pickle.dumps`` + ``send_bytes``): ``Connection.send``'s
``ForkingPickler`` copies the copyreg dispatch table on every call, and right after a decode step, with the
caches cold, one step's message cost 20 us that way, 10 us as ``Event`` objects with the plain pickler and
4 us as tuples (default LM, compiled, c=1: 0.63 -> 0.61 ms a token, against 0.56 in one process).
If the child dies, every request still in flight gets an error event and ``failure`` says why.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moekit.serve.request import EngineStopped, Event, SamplingParams, check_request

__all__ = ["EngineProcess", "EngineSpec", "open_model"]

log = logging.getLogger("moekit.serve")
_CALL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class EngineSpec:
    """What the child loads and how it decodes: ``offload`` is ``moekit.infer.offload.load_offloaded``'s
    keywords (None: resident), ``trace`` where the expert trace goes at shutdown, ``engine_kw`` the
    Engine's keywords (max_batch, deterministic, stats_interval, expert_window, prefill_chunk, ...)."""

    model_dir: str
    dtype: str | None = None
    threads: int | None = None
    offload: dict | None = None
    trace: str | None = None
    engine_kw: dict = field(default_factory=dict)


def open_model(model_dir: str, dtype: str | None, threads: int | None, offload: dict | None,
               record_trace: bool) -> tuple[Any, Any, Any]:
    """(model, tokenizer, OffloadedModel or None) ready to decode, intra-op threads set (``threads`` None:
    ``moekit.infer.load.choose_decode_threads``). A run trained on several processes is exported first."""
    import torch

    from moekit.infer.load import load_maybe_offloaded, ready_to_decode
    from moekit.parallel.run_export import export_if_distributed

    note = export_if_distributed(model_dir)  # a run trained on several processes: its DCP checkpoint
    if note:
        print(f"moekit serve: {note}", file=sys.stderr)
    model, tok, om = load_maybe_offloaded(model_dir, offload, dtype, record_trace=record_trace)
    if tok is None:  # an offloaded HF directory without tokenizer.json (a resident load raises itself)
        om.close()
        raise FileNotFoundError(f"{model_dir}: no tokenizer.json; the server needs one to encode prompts")
    compile_s = ready_to_decode(model, threads)  # before the engine thread starts
    print(f"moekit serve: {torch.get_num_threads()} intra-op thread(s)"
          + (f", single-row kernels compiled in {compile_s:.1f}s" if compile_s else ""),
          file=sys.stderr, flush=True)
    return model, tok, om


class EngineProcess:
    """Engine's interface (``submit`` / ``abort`` / ``shutdown``, ``max_seq_len``, ``experts``,
    ``num_running`` / ``num_waiting``) over an Engine in a child process; blocks until the child has loaded
    the model, and raises its load error (same type when it is a ValueError / FileNotFoundError) if not.
    ``info`` is the child's ready message: ``max_seq_len``, ``vocab_size``, ``eos_id``, ``tokenizer``
    (JSON), ``threads``, ``experts`` and ``offloaded`` (booleans)."""

    def __init__(self, spec: EngineSpec, metrics: Any = None):
        ctx = mp.get_context("spawn")  # a fresh interpreter: no copy of this process's threads or locks
        child_in, self._out = ctx.Pipe(duplex=False)
        self._in, child_out = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child_main, args=(spec, child_in, child_out), name="moekit-engine",
                                 daemon=True)
        self._proc.start()
        child_in.close()
        child_out.close()
        self.info = self._startup()
        self.max_seq_len = self.info["max_seq_len"]
        self.metrics = metrics
        self.failure: str | None = None
        self.experts = _Remote(self, "experts", "snapshot") if self.info["experts"] else None
        self.cache = _Remote(self, "cache", "stats") if self.info["offloaded"] else None
        self._sinks: dict[int, Callable[[Event], None]] = {}
        self._replies: dict[int, list] = {}
        self._send_lock, self._state = threading.Lock(), threading.Lock()
        self._next_id = self._next_call = 0
        self._stopping = False
        self._reader = threading.Thread(target=self._read_loop, name="moekit-engine-reader", daemon=True)
        self._reader.start()
        for remote in (self.experts, self.cache):
            if remote is not None:
                remote._read()  # a first answer, kept should the child die before a scrape
        if metrics is not None:
            metrics.watch_queue(self._queue_depth)
            if self.experts is not None:
                metrics.watch_experts(self.experts)
            if self.cache is not None:
                metrics.watch_cache(self.cache.stats)

    def _startup(self) -> dict:
        try:
            msg = self._in.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"the engine process exited while loading (exit code {self._proc.exitcode})") from None
        if msg[0] == "fatal":  # raised here under the child's exception name, as the CLI reports it
            self._proc.join(5)
            kind, text = msg[1], msg[2]
            raise (FileNotFoundError if kind == "FileNotFoundError" else type(kind, (ValueError,), {}))(text)
        return msg[1]

    # ---------------------------------------------------------------- the Engine's interface

    @property
    def num_running(self) -> int:
        return self._queue_depth()[0]

    @property
    def num_waiting(self) -> int:
        return self._queue_depth()[1]

    def _queue_depth(self) -> tuple[int, int]:
        """(running, waiting) in the child; (0, 0) once it is gone (nothing runs there any more)."""
        return (0, 0) if self.failure else tuple(self._call("queue"))

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Event], None]) -> int:
        """Queue one request in the child; returns its id. Raises as ``Engine.submit`` does."""
        check_request(prompt_ids, params, self.max_seq_len)
        if self.metrics is not None:
            sink = self.metrics.observer(sink, len(prompt_ids))
        with self._state:
            if self._stopping or self.failure:
                raise EngineStopped(self.failure or "the server is shutting down")
            seq_id, self._next_id = self._next_id, self._next_id + 1
            self._sinks[seq_id] = sink
        self._send(("submit", seq_id, list(prompt_ids), params))
        return seq_id

    def abort(self, seq_id: int) -> None:
        if seq_id in self._sinks:
            self._send(("abort", seq_id))

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop taking requests; the child cancels what is left (finish_reason "abort") and exits."""
        with self._state:
            self._stopping = True
        if self._proc.is_alive():
            self._send(("stop", timeout))
            self._proc.join(timeout + 10)
        if self._proc.is_alive():
            log.error("the engine process did not stop; terminating it")
            self._proc.terminate()
            self._proc.join(5)
        self._reader.join(5)

    # ---------------------------------------------------------------- the pipe

    def _send(self, msg: tuple) -> None:
        try:
            with self._send_lock:
                self._out.send(msg)
        except (BrokenPipeError, OSError):  # the child is gone: the reader fails what is in flight
            pass

    def _call(self, what: str) -> Any:
        """The child's answer to ``what`` (blocking; the child's reader answers between decode steps)."""
        done = threading.Event()
        with self._state:
            # the reader sets failure under this lock before it wakes the waiting calls: a call made after
            # that would wait out the whole timeout for a child that is gone
            if self.failure:
                raise RuntimeError(self.failure)
            n, self._next_call = self._next_call, self._next_call + 1
            self._replies[n] = [done, None]
        self._send(("call", n, what))
        if not done.wait(_CALL_TIMEOUT_S):
            self._replies.pop(n, None)
            raise RuntimeError(f"the engine process did not answer {what!r} within {_CALL_TIMEOUT_S:.0f} s")
        slot = self._replies.pop(n)
        if self.failure:  # woken by the reader as the child went away, not answered
            raise RuntimeError(self.failure)
        return slot[1]

    def _read_loop(self) -> None:
        while True:
            try:
                msg = self._in.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "events":
                for item in msg[1]:
                    self._deliver(item[0], item[1] if len(item) == 2 else Event("token", item[1], item[2]))
            elif msg[0] == "event":
                self._deliver(msg[1], msg[2])
            elif msg[0] == "reply":
                slot = self._replies.get(msg[1])
                if slot is not None:
                    slot[1] = msg[2]
                    slot[0].set()
            elif msg[0] == "stopped":
                break
        self._proc.join(5)
        with self._state:
            left, self._sinks = self._sinks, {}
            if not self._stopping:
                self.failure = f"the engine process exited unexpectedly (exit code {self._proc.exitcode})"
                log.error("%s", self.failure)
        for sink in left.values():
            _safe(sink, Event("error", message=self.failure or "the server is shutting down"))
        for slot in list(self._replies.values()):
            slot[0].set()  # callers see None

    def _deliver(self, seq_id: int, ev: Event) -> None:
        sink = self._sinks.pop(seq_id, None) if ev.kind != "token" else self._sinks.get(seq_id)
        if sink is not None and not _safe(sink, ev):
            self.abort(seq_id)


class _Remote:
    """A child-side object read through ``EngineProcess._call``: ``snapshot()`` of the expert load,
    ``stats()`` of the expert cache; once the child is gone, its last answer. ``close()`` is the child's
    (at shutdown)."""

    def __init__(self, engine: EngineProcess, what: str, method: str):
        self._engine, self._what, self._last = engine, what, None
        setattr(self, method, self._read)

    def _read(self) -> Any:
        try:
            self._last = self._engine._call(self._what)
        except RuntimeError:
            if self._last is None or not self._engine.failure:
                raise
        return self._last

    def close(self) -> None:
        pass


def _safe(sink: Callable[[Event], None], ev: Event) -> bool:
    try:
        sink(ev)
        return True
    except Exception:  # a sink that raises is its client's problem, not the engine's
        log.exception("a request's sink failed; dropping the request")
        return False


# -------------------------------------------------------------------------------- the child


def _child_main(spec: EngineSpec, inbox, outbox) -> None:
    from moekit.runtime import configure

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the terminal is the server's to handle
    configure()  # as the CLI does for every command (freed memory kept for reuse); threads: open_model
    lock = threading.Lock()

    def send(msg: tuple) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)  # read by the parent's Connection.recv
        with lock:
            outbox.send_bytes(data)

    step_events = _StepEvents(send)
    try:
        engine, om, info = _start(spec, step_events.flush)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which names it to the user
        send(("fatal", type(e).__name__, str(e)))
        return
    send(("ready", info))
    ids: dict[int, int] = {}
    grace = 5.0
    while True:
        try:
            msg = inbox.recv()
        except (EOFError, OSError):  # the server is gone
            break
        if msg[0] == "submit":
            _submit(engine, ids, send, step_events.add, *msg[1:])
        elif msg[0] == "abort":
            if msg[1] in ids:
                engine.abort(ids[msg[1]])
        elif msg[0] == "call":
            send(("reply", msg[1], _answer(engine, om, msg[2])))
        elif msg[0] == "stop":
            grace = msg[1]
            break
    engine.shutdown(grace)
    if om is not None:
        if spec.trace:
            om.save_trace(spec.trace)
        om.close()
    try:
        send(("stopped",))
    except (BrokenPipeError, OSError):
        pass


class _StepEvents:
    """The events of one engine step (its sinks run on the engine thread), sent together by ``flush``
    (the engine's ``on_step``)."""

    def __init__(self, send: Callable[[tuple], None]):
        self._send, self._events = send, []

    def add(self, seq_id: int, ev: Event) -> None:
        self._events.append((seq_id, ev.text, ev.token_id) if ev.kind == "token" else (seq_id, ev))

    def flush(self) -> None:
        if self._events:
            events, self._events = self._events, []
            try:
                self._send(("events", events))
            except (BrokenPipeError, OSError):  # the server is gone: the main loop sees EOF and stops
                pass


def _start(spec: EngineSpec, on_step: Callable[[], None]) -> tuple[Any, Any, dict]:
    import torch

    from moekit.infer.load import special_ids
    from moekit.serve.engine import Engine

    model, tok, om = open_model(spec.model_dir, spec.dtype, spec.threads, spec.offload, spec.trace is not None)
    _, end = special_ids(model, tok, spec.model_dir)
    engine = Engine(model, tok, eos_id=end, on_step=on_step, **spec.engine_kw).start()
    if engine.compile_s:
        print(f"moekit serve: decode step compiled in {engine.compile_s:.1f}s", file=sys.stderr, flush=True)
    info = {"max_seq_len": engine.max_seq_len, "vocab_size": model.config.vocab_size, "eos_id": end,
            "tokenizer": tok.to_str(), "threads": torch.get_num_threads(), "experts": engine.experts is not None,
            "offloaded": om is not None}
    return engine, om, info


def _submit(engine: Any, ids: dict[int, int], send: Callable[[tuple], None],
            add: Callable[[int, Event], None], seq_id: int, prompt: list[int], params: SamplingParams) -> None:
    def sink(ev: Event) -> None:  # on the engine thread
        if ev.kind != "token":
            ids.pop(seq_id, None)
        add(seq_id, ev)

    try:
        ids[seq_id] = engine.submit(prompt, params, sink)
    except (ValueError, EngineStopped) as e:
        send(("event", seq_id, Event("error", message=str(e))))


def _answer(engine: Any, om: Any, what: str) -> Any:
    if what == "queue":
        return engine.num_running, engine.num_waiting
    if what == "experts":
        return engine.experts.snapshot()
    if what == "cache":
        return om.stats()
    raise ValueError(f"unknown call {what!r}")
