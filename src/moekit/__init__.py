"""moekit: Mixture-of-Experts layers, routers, training and checkpoints for PyTorch."""
from moekit.config import MoEConfig
from moekit.nn.moe import MoELayer, MoEOutput, MoEStats

__all__ = ["MoEConfig", "MoELayer", "MoEOutput", "MoEStats"]
__version__ = "0.1.0"
