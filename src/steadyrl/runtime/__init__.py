"""Infrastructure the trainer and the stabilisers share: data-parallel helpers, checkpoints, metric
accumulation, per-step seeds."""
