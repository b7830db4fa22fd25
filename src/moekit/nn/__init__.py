"""nn.Modules: router, experts, the MoE layer."""
from moekit.nn.experts import MLP, GroupedExperts
from moekit.nn.moe import MoELayer, MoEOutput, MoEStats, SharedExperts
from moekit.nn.router import Router

__all__ = ["MLP", "GroupedExperts", "MoELayer", "MoEOutput", "MoEStats", "SharedExperts", "Router"]
