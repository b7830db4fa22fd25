"""`moekit serve RUN_DIR`: an OpenAI-compatible HTTP server over a moekit run or a Hugging Face directory.

    moekit serve runs/moe --port 8000 --max-batch 8
    curl localhost:8000/v1/completions -d '{"prompt": "def ", "max_tokens": 32, "temperature": 0}'

Binds 127.0.0.1 unless --host says otherwise. SIGTERM / SIGINT stop accepting connections, let
in-flight requests finish for --grace seconds, cancel the rest, and exit 0.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from moekit.infer.offload_flags import add_offload_args, offload_kwargs

__all__ = ["build_parser", "load_engine", "load_engine_process", "main", "start_engine"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moekit serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="RUN_DIR", help="a moekit run directory or an HF model directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default 8000)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="requests decoded together (default 8)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default none: no key)")
    p.add_argument("--deterministic", action="store_true",
                   help="decode each request in its own forward: output identical to `moekit generate` under "
                        "any concurrency, slower than batching (default off)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send (default none: RUN_DIR's name)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="intra-op CPU threads (default none: one per 32 MiB of weights a token reads, at "
                        "most the cores; 1 for small models, which keeps decode fast beside other processes)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], metavar="NAME",
                   help="cast the weights; one of: float32, bfloat16, float16 (default none: as loaded)")
    p.add_argument("--stats-interval", type=int, default=1, metavar="N",
                   help="read MoE routing stats every N forwards, 0 = never (default 1: every forward)")
    p.add_argument("--expert-window", type=int, default=256, metavar="N",
                   help="forwards in the window of the load-balance metrics (default 256)")
    p.add_argument("--prefill-chunk", type=int, default=64, metavar="N",
                   help="prompt tokens prefilled per step while other requests decode, 0 = whole prompts "
                        "(default 64: each chunk is a forward of fixed cost, ~5 ms for 16 tokens of the default "
                        "LM and ~8 ms for 64, so small chunks cost throughput and gain no tail latency)")
    p.add_argument("--mixed-prefill", action="store_true",
                   help="prefill chunks ride in the decode step's forward (decode rows padded) instead of a "
                        "forward of their own; rounds differently, so greedy output under concurrency matches "
                        "less often (default off)")
    p.add_argument("--compile", action="store_true",
                   help="decode the running batch in one compiled step over static rows, and prefill prompts "
                        "that arrive mid-decode in compiled chunks (moekit.infer.DecodeRows; with "
                        "--deterministic each request alone, moekit.infer.CompiledDecoder): compiled at start, "
                        "before /health is 200; resident models only; ignores --mixed-prefill (default off)")
    p.add_argument("--in-process", action="store_true",
                   help="decode on a thread of the server's process instead of a process of its own; the HTTP "
                        "side's Python then competes with decoding for one interpreter lock (default off)")
    p.add_argument("--no-metrics", action="store_true",
                   help="no request metrics, to measure what they cost (default off)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                   help="largest request body in bytes (default 1048576 = 1 MiB)")
    p.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                   help="seconds in-flight requests may finish after SIGTERM (default 10)")
    g = add_offload_args(p)
    g.add_argument("--trace", default=None, metavar="PATH",
                   help="with --expert-memory: write the expert trace (JSON) here at shutdown (default none: "
                        "not recorded)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   metavar="NAME",
                   help="server log level; one of: debug, info, warning, error; debug and info also log each "
                        "request (default warning)")
    return p


def load_engine(model_dir: str, metrics, *, dtype: str | None = None, threads: int | None = None,
                offload: dict | None = None, trace: str | None = None, **engine_kw):
    """Load DIR and start an engine over it in this process -> ``Loaded``. ``threads`` None:
    ``moekit.infer.load.choose_decode_threads`` for the loaded model. ``offload``:
    ``moekit.infer.offload.load_offloaded``'s keywords (``expert_memory``, ``policy``, ...) to keep the
    routed experts on disk behind a cache; ``trace``: where to write its expert trace at shutdown."""
    from moekit.serve.engine_process import open_model

    model, tok, om = open_model(model_dir, dtype, threads, offload, trace is not None)
    return start_engine(model, tok, model_dir, metrics, offloaded=om, trace=trace, **engine_kw)


def load_engine_process(model_dir: str, metrics, *, dtype: str | None = None, threads: int | None = None,
                        offload: dict | None = None, trace: str | None = None, **engine_kw):
    """As :func:`load_engine`, with the model loaded and decoded in a child process
    (``moekit.serve.engine_process``) -> ``Loaded``."""
    from tokenizers import Tokenizer

    from moekit.data import encode
    from moekit.serve.app import Loaded
    from moekit.serve.engine_process import EngineProcess, EngineSpec
    from moekit.serve.text import ChatTemplate

    spec = EngineSpec(model_dir, dtype, threads, offload, trace, engine_kw)
    engine = EngineProcess(spec, metrics)
    tok = Tokenizer.from_str(engine.info["tokenizer"])
    return Loaded(engine, ChatTemplate.from_dir(model_dir), lambda text: encode(tok, text),
                  lambda text: tok.encode(text, add_special_tokens=False).ids, engine.info["vocab_size"],
                  engine.cache)


def start_engine(model, tok, model_dir: str, metrics, *, offloaded=None, trace: str | None = None, **engine_kw):
    """An engine over a loaded model (Engine's keywords: max_batch, deterministic, stats_interval, ...),
    with DIR's end-of-document token and chat template -> ``Loaded``. ``offloaded``: the
    ``OffloadedModel`` behind ``model``, whose cache the metrics report and which closes with the server
    (writing its trace to ``trace`` if given)."""
    from moekit.data import encode
    from moekit.infer.load import special_ids
    from moekit.serve.app import Loaded
    from moekit.serve.engine import Engine
    from moekit.serve.text import ChatTemplate

    _, end = special_ids(model, tok, model_dir)
    engine = Engine(model, tok, eos_id=end, metrics=metrics, **engine_kw).start()
    if engine.compile_s:
        print(f"moekit serve: decode step compiled in {engine.compile_s:.1f}s", file=sys.stderr, flush=True)
    if offloaded is not None and metrics is not None:
        metrics.watch_cache(offloaded.stats)
    return Loaded(engine, ChatTemplate.from_dir(model_dir), lambda text: encode(tok, text),
                  lambda text: tok.encode(text, add_special_tokens=False).ids, model.config.vocab_size,
                  offloaded, trace)


class _Metrics:
    """Stand-in for ServeMetrics with --no-metrics: an empty registry, no observations."""

    def __init__(self):
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not Path(args.model_dir).is_dir():
        print(f"moekit serve: error: {args.model_dir} is not a directory", file=sys.stderr)
        return 2
    if args.compile and args.expert_memory is not None:
        print("moekit serve: error: --compile decodes with every expert resident: drop --expert-memory, or "
              "--compile", file=sys.stderr)
        return 2
    try:
        import uvicorn
    except ImportError:
        print("moekit serve: error: the server needs its extra: pip install 'moekit[serve]'", file=sys.stderr)
        return 2

    from moekit.serve.app import ServeState, build_app
    from moekit.serve.metrics import ServeMetrics

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    metrics = _Metrics() if args.no_metrics else ServeMetrics()
    state = ServeState(args.served_model_name or Path(args.model_dir).resolve().name, metrics, args.api_key,
                       args.max_body_bytes)

    def load():
        return (load_engine if args.in_process else load_engine_process)(args.model_dir, None if args.no_metrics else metrics, max_batch=args.max_batch,
                           deterministic=args.deterministic, dtype=args.dtype,
                           stats_interval=args.stats_interval, expert_window=args.expert_window,
                           prefill_chunk=args.prefill_chunk, mixed_prefill=args.mixed_prefill,
                           compile=args.compile, threads=args.threads,
                           offload=offload_kwargs(args) if args.expert_memory is not None else None,
                           trace=args.trace if args.expert_memory is not None else None)

    server = None

    def failed(message: str) -> None:
        print(f"moekit serve: error: {message}", file=sys.stderr)
        if server is not None:
            server.should_exit = True

    app = build_app(state, load, on_load_error=failed)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.grace, access_log=args.log_level in ("debug", "info"))
    server = _Server(config)
    print(f"moekit serve: {state.model_name} on http://{args.host}:{args.port} (max batch {args.max_batch}"
          f"{', deterministic' if args.deterministic else ''})", file=sys.stderr, flush=True)
    server.run()
    return 1 if state.load_error else 0


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises a captured SIGTERM after its graceful shutdown, so the process would end
            # by the signal (exit -15); a server that shut down as asked exits 0 instead.
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    return Server


def _Server(config):  # built lazily so that importing this module does not import uvicorn
    return _server_class()(config)
