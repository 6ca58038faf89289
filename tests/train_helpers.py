"""Shared pieces of the training tests: a tiny config, one built copy of the bundled sample, run readers.

The bundled sample is built once per test session (3 s) into a temporary directory and
every training test points `data.data_dir` at it, so runs differ only in what they test.

Run as a script (`python tests/train_helpers.py WORKDIR KEY=VALUE ...`), it trains with the
same jax settings as the tests' conftest; the multi-process and signal tests use it as the
process boundary. Extra environment (device count, coordinator) comes from the caller.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 224  # the bundled sample's longest example is 212 tokens

_BUILT: dict[str, str] = {}


def load_config_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", REPO / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_config(data_dir: str | None = None, preset: str = "default", config: str = "weibo", **overrides):
    """configs/<config>.py:<preset> on the tiny random Qwen2 shape, short sequences, no extras at the end."""
    c = load_config_module(config).get_config(preset)
    c.model.weights = "random:tiny-qwen2"
    c.data.max_length = MAX_LENGTH
    c.data.events_per_batch = 2
    c.data.cases_per_event = min(4, c.data.cases_per_event)  # LaMP keeps its 1
    c.data.eval_batch_size = 8
    c.loss.max_response_tokens = 24  # the sample's responses have at most 18 tokens
    c.train.num_steps = 3
    c.train.log_every = 1
    c.train.checkpoint_every = 1
    c.train.async_checkpoint = False
    c.train.eval_at_end = False
    c.train.generate_at_end = False
    c.train.tensorboard = False
    if data_dir:
        c.data.data_dir = data_dir
    set_overrides(c, overrides)
    return c


def typed_config(data_dir: str | None = None, preset: str = "default", config: str = "weibo", **overrides):
    """tiny_config as the typed run config: what the launchers pass below their --config."""
    from socialalign_jax.runs.run_config import as_run_config

    return as_run_config(tiny_config(data_dir, preset, config, **overrides), source=f"configs/{config}.py:{preset}")


def set_overrides(c, overrides: dict) -> None:
    """{'train.num_steps': 5} style overrides, parsed like --config.a.b=value (strings from the CLI)."""
    for key, val in overrides.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        cur = node[leaf]
        if isinstance(val, str) and not isinstance(cur, str):
            val = type(cur)(json.loads(val.lower()) if isinstance(cur, bool) else val)
        node[leaf] = val


def built_sample(tmp_root: str | None = None) -> str:
    """Build the bundled sample with the tiny model's tokenizer once; return its data_dir."""
    if "sample" in _BUILT:
        return _BUILT["sample"]
    from socialalign_jax.data import tfds_builders as B
    from socialalign_jax.data.sample import load_sample_dir
    from socialalign_jax.weights.resolve import resolve_weights

    root = Path(tmp_root or tempfile.mkdtemp(prefix="sa_train_"))
    tok_dir = root / "tokenizer"
    resolve_weights("random:tiny-qwen2").tokenizer.save_pretrained(str(tok_dir))
    data_dir = root / "data"
    B.build(str(data_dir), B.SocialConfig(name="default", source="socialweibo", input=str(load_sample_dir()),
                                          tokenizer=str(tok_dir), max_length=MAX_LENGTH, test_fraction=0.1))
    _BUILT["sample"] = str(data_dir)
    return str(data_dir)


def read_metrics(workdir: str, key: str = "train/loss") -> dict[int, float]:
    """{step: value} from metrics.jsonl (a resumed run appends; later rows of a step win)."""
    out = {}
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if key in row:
                out[int(row["step"])] = float(row[key])
    return out


def script_env(num_devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS"):
        env.pop(k, None)
    return env


def _main(argv: list[str]) -> int:
    import jax

    jax.config.update("jax_disable_most_optimizations", True)  # as tests/conftest.py
    jax.config.update("jax_default_matmul_precision", "highest")
    from socialalign_jax.core.errors import cli_main
    from socialalign_jax.train import loop

    workdir, pairs = argv[0], dict(a.split("=", 1) for a in argv[1:])
    config = pairs.pop("config", "weibo")
    cfg = tiny_config(config=config, **pairs)
    cli_main(lambda: (loop.train(cfg, workdir, progress=False), 0)[1])


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(_main(sys.argv[1:]))


def reference_run(num_steps: int) -> tuple[str, dict[int, float]]:
    """An uninterrupted single-process (8 device) run of tiny_config on the built sample, once per session."""
    key = f"ref{num_steps}"
    if key not in _BUILT:
        from socialalign_jax.train import loop

        wd = tempfile.mkdtemp(prefix="sa_ref_")
        loop.train(tiny_config(built_sample(), **{"train.num_steps": num_steps}), wd, progress=False)
        _BUILT[key] = wd
    return _BUILT[key], read_metrics(_BUILT[key])
