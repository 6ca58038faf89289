"""The test suite, one folder per part of the repository it mainly tests.

tests/<name>/ mirrors socialalign_jax/<name>/ (core, model, parallel, weights, data, runs, train,
inference, evaluation, predict, experiments); tests/launch/ drives the launchers end to end and
tests/benchmarks/ the benchmark scripts. Every folder is a package, so test modules are imported
as tests.<folder>.<module> (basenames may repeat across folders) and share the helpers here as
`tests.train_helpers`, `tests.helpers_hf` and `tests.authors_prompt`. tests/conftest.py (devices,
XLA flags, markers) applies to every folder.
"""
