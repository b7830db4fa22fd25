"""Every frozen, validated config dataclass. Imports nothing else of moekit and no torch.

Every error names the field, the value and the allowed range, so a bad config fails where it is
written, not deep inside a forward pass. Each field carries its help text (and whether it only tunes
training) in its metadata (:func:`moekit.config.base.setting`); the CLI's flags are generated from it.
"""
from moekit.config.base import ConfigBase, config_fields, setting, training_only_fields
from moekit.config.model import QK_NORM_SCOPES, MLAConfig, ModelConfig
from moekit.config.moe import (
    ACTIVATIONS,
    DROP_POLICIES,
    EXPERT_IMPLS,
    ROUTERS,
    SCORE_FUNCS,
    TOKEN_CHOICE_ROUTERS,
    MoEConfig,
)
from moekit.config.quant import QuantSpec
from moekit.config.train import ParallelConfig, TrainConfig

__all__ = ["QuantSpec", "ACTIVATIONS", "DROP_POLICIES", "EXPERT_IMPLS", "QK_NORM_SCOPES", "ROUTERS", "SCORE_FUNCS",
           "TOKEN_CHOICE_ROUTERS", "ConfigBase", "MLAConfig", "MoEConfig", "ModelConfig", "ParallelConfig",
           "TrainConfig", "config_fields", "setting", "training_only_fields"]
