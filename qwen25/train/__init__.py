"""Pre-training: packing masks, optimiser schedule (the training loop lands with its issue)."""
