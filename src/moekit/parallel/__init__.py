"""Expert parallelism on torch.distributed: groups, the all-to-all dispatcher, FSDP2 sharding, gradients,
checkpoints.

The only package of moekit that imports ``torch.distributed``. Importing it has no side effects; a
process group is created only by :func:`init_distributed` (called from ``moekit.cli``).
"""
from moekit.parallel.all_to_all import CommMeter, all_to_all
from moekit.parallel.checkpoint import export_dcp_to_safetensors, load_dcp, read_dcp_info, save_dcp
from moekit.parallel.dispatcher import AllToAllDispatcher, apply_expert_parallel, shard_moe_layer
from moekit.parallel.fsdp import FSDPLayout, apply_fsdp, clip_grad_norm_dtensor_
from moekit.parallel.grads import clip_grad_norm_, sync_gradients
from moekit.parallel.groups import (
                                    CollectiveError,
                                    ParallelGroups,
                                    build_groups,
                                    check_same_config,
                                    init_distributed,
                                    pick_backend,
)

__all__ = [
    "AllToAllDispatcher", "CollectiveError", "CommMeter", "FSDPLayout", "ParallelGroups", "all_to_all",
    "apply_expert_parallel", "apply_fsdp", "build_groups", "clip_grad_norm_dtensor_", "check_same_config", "clip_grad_norm_", "export_dcp_to_safetensors", "init_distributed",
    "load_dcp", "pick_backend", "read_dcp_info", "save_dcp", "shard_moe_layer", "sync_gradients",
]
