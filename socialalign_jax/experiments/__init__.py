"""Cross-validated experiments over held-out events (docs/experiments.md).

folds: k-fold splits by event; features: the frozen model's head inputs, cached on disk;
heads: design A, the sentiment head trained on cached features; cells: the per-cell
metrics record; runner: plans of rows x folds x seeds, resumable, with bootstrap summaries.
"""
