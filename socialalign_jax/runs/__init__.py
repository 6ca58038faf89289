"""A training run's directory as every reader sees it: config.json, the Orbax checkpoints and
the workdir lock. Training writes it; generation, prediction, serving and export read it
through `runs.restore`, which needs nothing from the training loop or the optimizer."""
