"""The serving engine: a scheduler thread that runs every request's decode step at token boundaries.

Legend: B running requests, V vocabulary.

Each request (a :class:`Sequence`) owns its KV cache, sampling parameters and RNG. One loop, on its own
thread: 1. admit waiting requests while the batch has room (``max_batch``). One with no other decoding (or
with ``deterministic``) is prefilled alone, in one forward, as ``moekit.infer.generate`` prefills; one that
arrives while others decode is fed ``prefill_chunk`` prompt tokens per step (with ``compile``, through the
compiled chunk), so that the others keep getting tokens; the last prompt position yields its first token;
2. one decode step for every running request: their pending tokens (B, 1) go through one forward over
   the stacked caches (``kvbatch``; with ``compile``, the compiled step over static rows), or, with
   ``deterministic``, one forward per request. With ``mixed_prefill`` a prefill chunk rides in the same
   forward as one more row (B + 1, n), its decode rows left-padded to n (masked; holes in their caches
   that the next re-stack drops), instead of a forward of its own;
3. each row samples its next token with its own parameters and generator; a request that hit its stop
   string, the end-of-document token or max_tokens leaves the batch, and so does one whose client went
   away (``abort``) -- so a short request never waits for a long one to finish.
A forward that raises fails only the request it belongs to: a batched step is retried row by row.
Results go to each request's ``sink`` (called on the engine thread; it must not block); ``on_step`` is
called there after each step and once at the end, so that sinks may buffer a step's events and send them
together.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from moekit.data import decode
from moekit.infer.compiled import DecodeState
from moekit.infer.generate import sample_next
from moekit.nn.attention import KVCache
from moekit.serve.compiled_steps import CompiledRows, CompiledSteps
from moekit.serve.kvbatch import empty_like, split_batch, stack_caches, step_inputs
from moekit.serve.metrics import ExpertLoad, ServeMetrics
from moekit.serve.request import EngineStopped, Event, SamplingParams, check_request
from moekit.serve.router_tap import RouterTap
from moekit.serve.text import StopText

__all__ = ["Engine", "EngineStopped", "Event", "SamplingParams", "Sequence", "check_request"]

log = logging.getLogger("moekit.serve")


@dataclass(eq=False)
class Sequence:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    text: StopText
    generator: torch.Generator
    cache: KVCache | None = None
    state: DecodeState | None = None  # stepping alone, compiled (CompiledSteps): its cache, not ``cache``
    prefilled: int = 0  # prompt tokens in the cache
    pending: int | None = None  # sampled, not yet fed to the model
    out_ids: list[int] = field(default_factory=list)
    aborted: bool = False
    done: bool = False


class Engine:
    """Continuous batching over one model. ``submit`` / ``abort`` are thread-safe."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 8, deterministic: bool = False,
                 eos_id: int | None = None, metrics: ServeMetrics | None = None, stats_interval: int = 1,
                 expert_window: int = 256, prefill_chunk: int = 64, mixed_prefill: bool = False,
                 compile: bool = False, on_step: Callable[[], None] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.deterministic, self.eos_id = max_batch, deterministic, eos_id
        self.max_seq_len = model.config.max_seq_len
        self.n_layers = model.config.n_layers
        self.metrics = metrics
        self.stats_interval = stats_interval  # count tokens per expert every n-th forward (0 = never)
        self.experts, self._tap = self._expert_load(expert_window)
        if metrics is not None:
            metrics.watch_queue(lambda: (self.num_running, self.num_waiting))
            if self.experts is not None:
                metrics.watch_experts(self.experts)
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # decoding
        self._prefilling: list[Sequence] = []  # admitted to the batch, prompt not all in the cache yet
        self.prefill_chunk = prefill_chunk
        # a sliding window counts cache positions, holes included: such models prefill in their own forward.
        # Off by default: padded rows round differently (greedy agreement with c=1 98.3% at c=4), no faster
        self._mixed = (mixed_prefill and not deterministic and not compile and prefill_chunk > 0
                       and not any(model.new_kv_cache().windows))
        self._batch: tuple[list[Sequence], KVCache, list[int]] | None = None
        # compiled: each request alone (deterministic), or the whole batch (and chunked prompts) in static rows
        self._compiled = CompiledSteps(self.model, self.max_seq_len) if compile and deterministic else None
        # one row: no prompt is ever admitted while another decodes, so no chunk graph to compile
        chunk = max(prefill_chunk, 0) if max_batch > 1 else 0
        self._rows = CompiledRows(self.model, max_batch, chunk) if compile and not self._compiled else None
        self.compile_s = next((c.compile_s for c in (self._compiled, self._rows) if c is not None), 0.0)
        self._next_id = self._forwards = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="moekit-engine", daemon=True)
        self.steps = 0
        self._on_step = on_step or (lambda: None)  # after each step: where a sink that buffers flushes
        self.failure: str | None = None  # why the engine can serve no more (an EngineProcess whose child died)

    def _expert_load(self, window: int) -> tuple[ExpertLoad | None, RouterTap | None]:
        moe = getattr(self.model.config, "moe", None)
        if moe is None or self.stats_interval <= 0:
            return None, None
        tap = RouterTap(self.model, moe.num_experts)
        if not tap.layers:
            tap.remove()
            return None, None
        return ExpertLoad(tap.layers, moe.num_experts, window), tap

    # ---------------------------------------------------------------- the public, thread-safe side

    @property
    def num_running(self) -> int:
        return len(self._running) + len(self._prefilling)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Event], None]) -> int:
        """Queue one request; returns its id. Raises ValueError for a prompt that does not fit."""
        check_request(prompt_ids, params, self.max_seq_len)
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        if self.metrics is not None:
            sink = self.metrics.observer(sink, len(prompt_ids))
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            seq = Sequence(self._next_id, list(prompt_ids), params, sink,
                           StopText(lambda ids: decode(self.tokenizer, ids), params.stop),
                           torch.Generator().manual_seed(seed))
            self._next_id += 1
            self._waiting.append(seq)
            self._cond.notify()
        return seq.id

    def abort(self, seq_id: int) -> None:
        """Drop a request (its client went away); it leaves the batch at the next token boundary."""
        with self._cond:
            for seq in (*self._waiting, *self._prefilling, *self._running):
                if seq.id == seq_id:
                    seq.aborted = True
            self._cond.notify()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop taking requests, cancel what is left (finish_reason "abort") and join the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---------------------------------------------------------------- the engine thread

    def _loop(self) -> None:
        with torch.inference_mode():  # per thread, as generate() decodes
            self._run()

    def _run(self) -> None:
        if self._tap is not None:
            self._tap.attach()
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._running and not self._prefilling:
                    self._cond.wait()
                if self._stopping:
                    break
                while self._waiting and self.num_running < self.max_batch:
                    self._prefilling.append(self._waiting.popleft())
            try:
                self._prefill_step()
                self._running = [s for s in self._running if not self._reap(s)]
                if self._running:
                    self._decode_step()
                self._running = [s for s in self._running if not s.done]
            except Exception:  # a bug in the engine itself: fail what runs, keep serving
                log.exception("engine step failed")
                for seq in (*self._running, *self._prefilling):
                    self._fail(seq, "internal error in the serving engine")
                self._running, self._prefilling, self._batch = [], [], None
            self.steps += 1
            self._on_step()
        with self._cond:
            left = [*self._waiting, *self._prefilling, *self._running]
            self._waiting.clear()
        for seq in left:
            self._finish(seq, "abort")
        self._running, self._prefilling = [], []
        if self._tap is not None:
            self._tap.remove()
        self._on_step()

    def _reap(self, seq: Sequence) -> bool:
        if seq.aborted and not seq.done:
            self._finish(seq, "abort")
        return seq.done

    def _forward(self, ids_BS: Tensor, cache: KVCache, mask_BS: Tensor | None = None) -> Tensor:
        out = self.model(ids_BS, kv_cache=cache, attention_mask=mask_BS, logits_to_keep=1)
        valid_T = None if mask_BS is None else mask_BS.reshape(-1).bool()  # padding is not counted
        self._count(None if self._tap is None else self._tap.take(valid_T))  # not out.stats: see router_tap
        return out.logits[:, -1]

    def _count(self, counts_LE) -> None:
        self._forwards += 1
        if counts_LE is not None and self._forwards % self.stats_interval == 0:
            self.experts.add(counts_LE)

    def _prefill_step(self) -> None:
        """Prefill admitted requests. While others decode (and not ``deterministic``), only one chunk of
        ``prefill_chunk`` prompt tokens per step, so that a long prompt delays their next token by one
        chunk's forward, not by the whole prompt's. A request with the batch to itself is prefilled in
        one forward, exactly as ``generate`` does it (a chunked prefill rounds differently)."""
        self._prefilling = [s for s in self._prefilling if not self._reap(s)]
        if not self._prefilling:
            return
        if self.deterministic or not self._running or self.prefill_chunk <= 0:
            for seq in self._prefilling:
                self._prefill(seq, len(seq.prompt_ids))
        elif not self._mixed:  # else the decode step carries the chunk (_decode_step)
            self._prefill(self._prefilling[0], self.prefill_chunk, while_decoding=True)
        self._prefilling = [s for s in self._prefilling if not s.done and s.prefilled < len(s.prompt_ids)]

    def _prefill(self, seq: Sequence, n_tokens: int, while_decoding: bool = False) -> None:
        """Feed the next ``n_tokens`` prompt tokens; after the last, the request samples its first token."""
        end = min(len(seq.prompt_ids), seq.prefilled + n_tokens)
        ids = seq.prompt_ids[seq.prefilled:end]
        staged = self._rows is not None and self._rows.stages(seq, while_decoding)
        if seq.cache is None and not staged:  # untrimmed even with sliding windows: stacking keeps no trim counts
            seq.cache = KVCache(self.n_layers)
        try:
            logits_1V = (self._rows.prefill(seq, ids, self._tap and self._tap.layers, self._count) if staged
                         else self._forward(torch.tensor([ids]), seq.cache))
        except Exception as e:  # noqa: BLE001 - a model failure fails its request only
            self._fail(seq, e)
            return
        self._prefilled(seq, end, logits_1V)

    def _prefilled(self, seq: Sequence, end: int, logits_1V: Tensor) -> None:
        """The prompt is in the cache up to ``end``; after its last token, the request starts decoding."""
        seq.prefilled = end
        if end == len(seq.prompt_ids):  # moved, never in both lists (num_running is read from other threads)
            self._prefilling = [s for s in self._prefilling if s is not seq]
            self._running.append(seq)
            self._emit_next(seq, logits_1V)

    def _unbatch(self) -> None:
        """Hand each member of the stacked batch its own cache back (views of the batch tensors)."""
        if self._batch is not None:
            members, cache, pads = self._batch
            for seq, own in zip(members, split_batch(cache, pads)):
                seq.cache = own
            self._batch = None

    def _step_alone(self, seqs: list[Sequence]) -> None:
        self._unbatch()
        for seq in seqs:
            try:
                ids_11 = torch.tensor([[seq.pending]])
                logits_1V = (self._forward(ids_11, seq.cache) if self._compiled is None
                             else self._compiled.step(seq, ids_11, self._tap and self._tap.layers, self._count))
            except Exception as e:  # noqa: BLE001 - a model failure fails its request only
                self._fail(seq, e)
                continue
            self._emit_next(seq, logits_1V)

    def _rows_step(self, seqs: list[Sequence]) -> None:
        try:
            logits = self._rows.step(seqs, self._tap and self._tap.layers, self._count)
        except Exception:  # noqa: BLE001 - retried eagerly, row by row, to find the request at fault
            log.warning("a compiled step failed; retrying its %d requests one by one", len(seqs))
            self._rows.evict()
            self._step_alone(seqs)
            return
        for seq in seqs:
            self._emit_next(seq, logits[seq])

    def _decode_step(self) -> None:
        seqs = list(self._running)
        if self._rows is not None:
            return self._rows_step(seqs)
        rider = self._prefilling[0] if self._mixed and self._prefilling else None
        if rider is None and (self.deterministic or len(seqs) == 1):
            return self._step_alone(seqs)
        n = 1 if rider is None else min(self.prefill_chunk, len(rider.prompt_ids) - rider.prefilled)
        cache = self._stacked(seqs if rider is None else [*seqs, rider], n)
        if rider is not None and cache.length + n > self.max_seq_len:  # padded to n, a row would pass the context
            self._prefill(rider, n)
            rider, n = None, 1
            cache = self._stacked(seqs, n)
        members = seqs if rider is None else [*seqs, rider]
        ids, mask = step_inputs([s.pending for s in seqs], None if rider is None
                                else rider.prompt_ids[rider.prefilled:rider.prefilled + n])
        saved = (list(cache.k), list(cache.v), cache.mask)  # update() replaces tensors, never writes them
        try:
            logits_BV = self._forward(ids, cache, mask)
        except Exception:  # noqa: BLE001 - retried row by row below
            cache.k, cache.v, cache.mask = saved
            log.warning("a batched step failed; retrying its %d requests one by one", len(members))
            self._step_alone(seqs)  # finds the request at fault; the others go on
            if rider is not None:
                self._prefill(rider, n)
            return
        for i, seq in enumerate(seqs):
            self._emit_next(seq, logits_BV[i:i + 1])
        if rider is not None:  # joins the running batch last, where its row already is
            self._prefilled(rider, rider.prefilled + n, logits_BV[-1:])

    def _stacked(self, members: list[Sequence], n: int) -> KVCache:
        """The batch cache of ``members`` (re-stacked when they changed, or when ``n`` more positions would
        pass the context: re-stacking drops the holes of padded chunks)."""
        if self._batch is not None and self._batch[0] == members and self._batch[1].length + n <= self.max_seq_len:
            return self._batch[1]
        self._unbatch()
        for seq in members:
            if seq.cache is None:  # a rider's first chunk: an empty cache shaped like the others'
                seq.cache = empty_like(members[0].cache)
        cache, pads = stack_caches([s.cache for s in members])
        self._batch = (members, cache, pads)
        return cache

    def _emit_next(self, seq: Sequence, logits_1V: Tensor) -> None:
        """Sample the next token of one request and hand its text to the sink."""
        p = seq.params
        token = int(sample_next(logits_1V, p.temperature, p.top_k, p.top_p, seq.generator)[0])
        seq.out_ids.append(token)
        if self.eos_id is not None and token == self.eos_id and not p.ignore_eos:
            self._send(seq, Event("token", seq.text.flush(), token))
            self._finish(seq, "stop")
            return
        delta, stopped = seq.text.push(token)
        if not stopped and len(seq.out_ids) >= p.max_tokens:
            delta += seq.text.flush()
        self._send(seq, Event("token", delta, token))
        if stopped or len(seq.out_ids) >= p.max_tokens:
            self._finish(seq, "stop" if stopped else "length")
        else:
            seq.pending = token

    def _send(self, seq: Sequence, event: Event) -> None:
        try:
            seq.sink(event)
        except Exception:  # a sink that raises is its client's problem, not the batch's
            log.exception("request %d: sink failed; dropping the request", seq.id)
            seq.aborted = True

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.done:
            return
        seq.done, seq.cache, seq.state = True, None, None
        ended = seq.out_ids and seq.out_ids[-1] == self.eos_id and not seq.params.ignore_eos
        n_out = len(seq.out_ids) - (1 if ended else 0)
        self._send(seq, Event("finish", finish_reason=reason, prompt_tokens=len(seq.prompt_ids),
                              completion_tokens=n_out))

    def _fail(self, seq: Sequence, error: Exception | str) -> None:
        if isinstance(error, Exception):
            log.error("request %d failed in the model: %r", seq.id, error, exc_info=error)
        seq.done, seq.cache, seq.state = True, None, None
        msg = error if isinstance(error, str) else f"the model failed on this request: {type(error).__name__}: {error}"
        self._send(seq, Event("error", message=msg))
