"""Plumbing that every other package leans on: atomic output files (atomic_io), the one-line user
error and the CLI wrapper that prints it (errors), JSON Lines input checks (jsonl), the launch
scripts' quiet start-up (cli_setup), the JSD formula shared by the training loss and the metric
(divergence), the rounding of lengths up to shape buckets (buckets) and the sentiment label set
(labels). Nothing here imports the rest of socialalign_jax, so any module can use it without
an import cycle, and one implementation of each concept lives in one place.
"""
