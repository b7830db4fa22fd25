"""Model -> smaller or different model: quantize (int8 / int4 routed experts), prune experts, upcycle dense.

The quantized formats are pure maths in ``moekit.functional.quant``, the modules that compute with them in
``moekit.nn.quantized``, and reading a quantized run in ``moekit.rundir``: this package holds the tools.
"""
from moekit.compress.prune import expert_scores, prune_model
from moekit.compress.quantize import QuantSpec, collect_hessians, coverage, quantize_model, save_quantized
from moekit.compress.upcycle import start_rule, upcycle_model

__all__ = ["QuantSpec", "collect_hessians", "coverage", "expert_scores", "prune_model", "quantize_model",
           "save_quantized", "start_rule", "upcycle_model"]
