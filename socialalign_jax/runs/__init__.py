"""A training run's directory as every reader sees it: its typed config (run_config) and the
checks of its values (validation), config.json, the Orbax checkpoints and the workdir lock.
Training writes it; generation, prediction, serving and export read it through `runs.restore`,
which needs nothing from the training loop or the optimizer. Below data/ and train/ in the
package layers, so both can take the typed config.
"""
