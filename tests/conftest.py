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
                      os.path.join(tempfile.gettempdir(), f"socialalign_jax_test_xla_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
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
# on 2 cores); `pytest` (CI, .ci/run) runs everything. A file is `slow` when its tests train,
# sample, compile whole models or start processes; `integration` when they drive the launchers
# or a server end to end in subprocesses. One list each, here.
SLOW_FILES = {
    "test_adapter_io.py", "test_backend_paths.py", "test_build_dataset.py", "test_builders.py",
    "test_config_validation.py", "test_converters.py", "test_device_check.py", "test_evaluate_cli.py",
    "test_experiment.py", "test_experiment_design_b.py", "test_experiment_resume.py", "test_export.py",
    "test_export_hf.py", "test_faults.py", "test_generate_cli.py", "test_gguf.py", "test_model_cache.py",
    "test_model_labeller.py", "test_pac_lora_decode.py", "test_plan.py", "test_predict.py", "test_sampling.py",
    "test_score.py", "test_score_spans.py", "test_serve.py", "test_tpu_compile.py", "test_train_frozen.py",
    "test_train_learns.py", "test_train_learns_sample.py", "test_train_multiprocess.py", "test_train_resume.py",
    "test_train_sharding.py",
}
INTEGRATION_FILES = {
    "test_build_dataset.py", "test_config_validation.py", "test_device_check.py", "test_evaluate_cli.py",
    "test_experiment.py", "test_experiment_design_b.py", "test_experiment_resume.py", "test_export.py",
    "test_faults.py", "test_generate_cli.py", "test_predict.py", "test_score.py", "test_serve.py",
    "test_train_multiprocess.py",
}


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        name = os.path.basename(str(item.fspath))
        if name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
        if name in INTEGRATION_FILES:
            item.add_marker(pytest.mark.integration)
