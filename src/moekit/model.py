"""Public home of the language model: ``from moekit.model import ModelConfig, MoETransformer``."""
from moekit.nn.attention import KVCache
from moekit.nn.transformer import ModelConfig, ModelOutput, MoETransformer

__all__ = ["ModelConfig", "MoETransformer", "ModelOutput", "KVCache"]
