"""What a MoE model costs before anyone loads it: parameters, FLOPs, memory (``moekit spec``).

The command itself, and ``summary`` (its ``--json`` object), live in ``moekit.spec.cli``.
"""
from moekit.spec.count import SUPPORTED_MODEL_TYPES, count_params
from moekit.spec.presets import PRESETS, PUBLISHED, Published, get_preset
from moekit.spec.report import COMPONENTS, AttentionLayer, Component, SpecReport, flops_per_token, memory

__all__ = [
    "COMPONENTS",
    "PRESETS",
    "PUBLISHED",
    "SUPPORTED_MODEL_TYPES",
    "AttentionLayer",
    "Component",
    "Published",
    "SpecReport",
    "count_params",
    "flops_per_token",
    "get_preset",
    "memory",
]
