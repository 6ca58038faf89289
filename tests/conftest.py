"""Test setup: 8 fake CPU devices and fast compiles, fixed before jax is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# JAX's persistent compilation cache, shared by this process and every subprocess it starts
# (they inherit the environment): the suite compiles the same tiny train/eval/sample steps in
# dozens of runs and CLI subprocesses, and a hit skips XLA entirely (a CLI training run drops
# from ~100 s to ~25 s on 2 cores). Keys hash the HLO, the flags and the jax version, so a
# stale entry is never used. One directory per user, kept between runs.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"socialalign_jax_test_xla_cache_locked_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Capped, JAX takes a file lock around every cache read and write (core/cli_setup.py says why):
# the suite's subprocesses compile the same programs at the same time, and an uncapped cache let
# one of them read another's half-written entry. Its own directory: entries an uncapped run wrote
# have no access-time files, and a capped cache then fails every write with a warning.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# A CI runner inside a Slurm/MPI/TPU job must not make the tests' in-process and subprocess
# training runs try jax.distributed.initialize: the suite is one process on fake CPU devices.
for _name in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "MEGASCALE_"))
              or k in ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID")]:
    del os.environ[_name]

import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_default_matmul_precision", "highest")


# ----------------------------------------------------------------------------- markers
# `pytest -m "not slow"` is the inner loop (unit tests against their references, a few minutes
# on 2 cores); `pytest -n 2` (CI, .ci/run) runs everything. A file is `slow` when its tests train,
# sample, compile whole models or start processes; `integration` when they drive the launchers
# or a server end to end in subprocesses. One list each, here, of paths relative to tests/.
SLOW_FILES = {
    "benchmarks/test_device_check.py", "benchmarks/test_predict_side_by_side.py", "benchmarks/test_zeroshot_bench.py",
    "benchmarks/test_dtype_agreement.py", "data/test_builders.py",
    "data/test_converters.py", "evaluation/test_model_labeller.py", "experiments/test_experiment.py",
    "experiments/test_experiment_design_b.py", "experiments/test_experiment_resume.py", "experiments/test_forecast.py",
    "inference/test_export.py", "inference/test_export_hf.py", "inference/test_generate_cli.py",
    "model/test_sampling.py", "launch/test_build_dataset.py", "launch/test_config_validation.py",
    "launch/test_evaluate_cli.py", "launch/test_score.py", "launch/test_score_spans.py",
    "model/test_backend_paths.py", "model/test_matmul_out.py", "model/test_model_cache.py",
    "model/test_pac_lora_decode.py",
    "model/test_shared_prefill.py", "model/test_shared_prefill_isolated.py",
    "tools/test_plan.py", "parallel/test_tpu_compile.py", "predict/test_predict.py",
    "predict/test_serve.py", "runs/test_checkpoint_items.py", "runs/test_faults.py", "runs/test_full_disk.py",
    "train/test_train_frozen.py", "train/test_train_hooks.py", "train/test_train_learns.py",
    "train/test_train_learns_sample.py",
    "train/test_train_multiprocess.py", "train/test_train_resume.py", "train/test_train_sharding.py",
    "weights/test_adapter_io.py", "weights/test_gguf.py",
}
INTEGRATION_FILES = {
    "benchmarks/test_device_check.py", "data/test_converters.py", "experiments/test_experiment.py",
    "experiments/test_experiment_design_b.py", "experiments/test_experiment_resume.py",
    "inference/test_export.py", "inference/test_generate_cli.py", "launch/test_build_dataset.py",
    "launch/test_config_validation.py", "launch/test_evaluate_cli.py", "launch/test_score.py",
    "predict/test_predict.py", "predict/test_serve.py", "runs/test_faults.py", "runs/test_full_disk.py",
    "train/test_train_multiprocess.py",
}


# The suite's command (README, .ci/run) is `pytest -q -n 2`: two pytest-xdist workers, which hand out
# whole files (`--dist loadfile` in pyproject.toml, so a file's module fixtures are built once) in
# collection order (`--no-loadscope-reorder`). Files start heaviest first, so the long ones run side
# by side from the start and the many short unit files fill in at the end, where they keep both
# workers busy until the last one: these files (each over ~40 s, `pytest --durations=0`, 2 cores,
# 2026-12-08), then the rest of SLOW_FILES, then every other file, each group in pytest's order.
# On 2 cores one process left ~45% of the CPU idle (compiles and single-threaded steps): the suite
# took 35.0 min in one process and 24.5 min in two workers, both from an empty compilation cache.
HEAVIEST_FILES = (
    "model/test_shared_prefill_isolated.py", "runs/test_faults.py", "predict/test_predict.py",
    "train/test_train_learns_sample.py", "model/test_backend_paths.py", "benchmarks/test_device_check.py",
    "inference/test_generate_cli.py", "evaluation/test_model_labeller.py", "train/test_losses.py",
    "train/test_train_frozen.py", "experiments/test_experiment_design_b.py", "model/test_model_cache.py",
    "train/test_train_multiprocess.py", "train/test_train_sharding.py",
)


def pytest_collection_modifyitems(config, items):
    import pytest

    here = os.path.dirname(os.path.abspath(__file__))
    stale = sorted(p for p in SLOW_FILES | INTEGRATION_FILES | set(HEAVIEST_FILES)
                   if not os.path.isfile(os.path.join(here, p)))
    if stale:  # a moved or renamed file would otherwise silently lose its markers
        raise pytest.UsageError(f"tests/conftest.py marks files that do not exist: {', '.join(stale)}")
    names = {item: os.path.relpath(str(item.path), here).replace(os.sep, "/") for item in items}
    for item, name in names.items():
        if name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
        if name in INTEGRATION_FILES:
            item.add_marker(pytest.mark.integration)
    rank = {name: i for i, name in enumerate(HEAVIEST_FILES)}

    # Heaviest files first; a stable sort keeps pytest's order inside each group and each file.
    items[:] = sorted(items, key=lambda it: rank.get(names[it], len(rank) + (names[it] not in SLOW_FILES)))


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs_after_each_module():
    """jax.clear_caches() after every test file. Each worker is one long process, and every compiled
    XLA:CPU program keeps its own memory mappings; in the full suite XLA segfaulted inside a compile
    after ~650 tests (four times, 2026-12-07, in different tests). Our unconfirmed guess: the
    process runs out of the kernel's per-process map count (vm.max_map_count, 65530 here); this
    bounds the live programs either way. A program a later file needs comes back from the
    persistent cache."""
    yield
    jax.clear_caches()
