"""Training: the jitted step, checkpoints, logging and the loop that ties them to a config."""
