"""Training: the objective (losses), the optimizer (optim), the jitted step, logging and the loop that
ties them to a config. A run's checkpoints are in socialalign_jax/runs/ (inference reads them too)."""
