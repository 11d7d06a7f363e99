"""Training: the recipe config, the Accelerate loop, EMA and checkpoints."""
