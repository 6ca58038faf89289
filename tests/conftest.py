"""Test setup: 8 fake CPU devices and fast compiles, fixed before jax is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# A CI runner inside a Slurm/MPI/TPU job must not make the tests' in-process and subprocess
# training runs try jax.distributed.initialize: the suite is one process on fake CPU devices.
for _name in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "MEGASCALE_"))
              or k in ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID")]:
    del os.environ[_name]

import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_default_matmul_precision", "highest")
