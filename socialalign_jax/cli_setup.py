"""Process-level setup shared by the launch scripts: a quiet, predictable start.

Imported before jax: it only sets environment variables and logging levels, so that a user
sees progress bars and results, not a wall of TensorFlow/absl/XLA warnings.
"""

from __future__ import annotations

import logging
import os
import warnings


def quiet_startup() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub: every path is local
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Explicitly requested dtype.*")
    for name in ("absl", "orbax", "jax._src.xla_bridge", "tensorflow_datasets", "jieba", "etils"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
