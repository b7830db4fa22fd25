"""What a MoE model costs before anyone loads it: parameters, FLOPs, memory (``moekit spec``).

The command itself, and ``summary`` (its ``--json`` object), live in ``moekit.spec.cli``.
"""
from moekit.spec.count import (
    COMPONENTS,
    SUPPORTED_MODEL_TYPES,
    AttentionLayer,
    Component,
    SpecReport,
    count_params,
    flops_per_token,
    memory,
)
from moekit.spec.presets import PRESETS, PUBLISHED, Published, get_preset

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
