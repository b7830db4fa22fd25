"""Pure tensor maths: routing, losses, dispatch. No nn.Module, no torch.distributed."""
from moekit.functional.dispatch import *  # noqa: F401,F403
from moekit.functional.losses import *  # noqa: F401,F403
from moekit.functional.routing import *  # noqa: F401,F403
from moekit.functional.stats import *  # noqa: F401,F403
