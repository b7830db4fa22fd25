"""Public home of the balancing losses (pure functions; see :mod:`moekit.functional.losses`)."""
from moekit.functional.losses import (  # noqa: F401
    cv_squared,
    expert_bias_update,
    importance_loss,
    load_balancing_loss,
    sequence_balancing_loss,
    z_loss,
)
from moekit.functional.bias_update import centered_sign_bias_update, quantile_bias_target  # noqa: F401
from moekit.functional.losses_device import comm_balance_loss, device_balance_loss  # noqa: F401
from moekit.functional.losses_global import global_balancing_loss  # noqa: F401

__all__ = ["load_balancing_loss", "sequence_balancing_loss", "z_loss", "importance_loss", "cv_squared",
           "expert_bias_update", "centered_sign_bias_update", "quantile_bias_target", "device_balance_loss",
           "comm_balance_loss", "global_balancing_loss"]
