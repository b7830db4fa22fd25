"""Training: config, loop, checkpoints, MoE-vs-dense comparison."""
