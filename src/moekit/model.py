"""Public home of the language model: ``from moekit.model import ModelConfig, MoETransformer``."""
from moekit.config import ModelConfig
from moekit.nn.attention import KVCache
from moekit.nn.transformer import ModelOutput, MoETransformer

__all__ = ["KVCache", "MoETransformer", "ModelConfig", "ModelOutput"]
