"""The compute dtypes a config may name (model.dtype, launch/predict.py --dtype), declared once here so a
launcher can list them before anything imports jax; `model.config` maps each to its jnp type."""

DTYPE_NAMES = ("float32", "bfloat16", "float16")
