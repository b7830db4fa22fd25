"""Serving: an OpenAI-compatible HTTP app (``app``, ``protocol``) over a continuous-batching engine
(``engine``, ``kvbatch``), with Prometheus metrics (``metrics``). ``moekit serve`` is ``serve.cli``.

Nothing here is imported by the rest of moekit; the HTTP dependencies (fastapi, uvicorn,
prometheus_client, jinja2) are imported only by these modules.
"""
__all__: list[str] = []
