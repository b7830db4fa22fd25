"""Public home of the balancing losses (pure functions; see :mod:`moekit.functional.losses`)."""
from moekit.functional.losses import (  # noqa: F401
    cv_squared,
    expert_bias_update,
    importance_loss,
    load_balancing_loss,
    sequence_balancing_loss,
    z_loss,
)

__all__ = ["load_balancing_loss", "sequence_balancing_loss", "z_loss", "importance_loss", "cv_squared",
           "expert_bias_update"]
