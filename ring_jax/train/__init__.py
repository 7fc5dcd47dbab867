"""Training: config sections, optimizer, train step, checkpoints, metrics."""
