"""Inference: KV-cached autoregressive decoding and sampling, and loading a run directory."""
from moekit.infer.compiled import CompiledDecoder
from moekit.infer.generate import filter_logits, generate, load_run, sample_next
from moekit.infer.rows import DecodeRows

__all__ = ["CompiledDecoder", "DecodeRows", "filter_logits", "generate", "load_run", "sample_next"]
