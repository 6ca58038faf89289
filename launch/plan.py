"""Per-device memory of the training step on a mesh, before renting the mesh.

    python launch/plan.py --config configs/weibo.py:7b --mesh fsdp=8
    python launch/plan.py --config configs/weibo.py:7b --mesh data=2,fsdp=2,tensor=2 [--batch 16 --seq 1024]

Compiles the step ahead of time for data x fsdp x tensor fake CPU devices on abstract
shapes (no weights are read, nothing is allocated) and prints per-device bytes of the
frozen params, adapters, optimizer state and batch (exact, from the shardings) and the
compiled step's argument / output / temp sizes (XLA's buffer assignment on CPU: an
estimate of the accelerator's activation peak).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The model shape of each configs/weibo.py preset whose weights are given at run time.
_PRESET_MODELS = {"7b": "qwen2.5-7b", "1.5b": "qwen2.5-1.5b", "0.5b": "qwen2.5-0.5b"}


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/weibo.py:7b", help="config file[:preset]")
    p.add_argument("--mesh", default="fsdp=8", help="data=N,fsdp=N,tensor=N (device count = product)")
    p.add_argument("--model", default="", help="model preset (presets.py) instead of the config's weights")
    p.add_argument("--batch", type=int, default=0, help="global batch (default: the config's G x M)")
    p.add_argument("--seq", type=int, default=0, help="sequence length (default: data.max_length)")
    p.add_argument("--no_compile", action="store_true", help="only the exact per-tree figures")
    return p.parse_args(argv)


def _load_config(spec: str):
    from socialalign_jax.errors import UserError

    path, _, preset = spec.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"--config: file {path} does not exist")
    mod_spec = importlib.util.spec_from_file_location("plan_config", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    try:
        return mod.get_config(preset) if preset else mod.get_config()
    except ValueError as exc:
        raise UserError(f"--config {spec}: {exc}") from None


def _model_config(cfg, name: str):
    from socialalign_jax import hf_import, presets
    from socialalign_jax.errors import UserError

    weights = str(cfg.model.weights)
    if not name and weights.startswith("random:"):
        name = weights.split(":", 1)[1]
    if not name and weights.startswith("hf:") and os.path.isfile(os.path.join(weights[3:], "config.json")):
        mc, _ = hf_import.read_config(weights[3:])  # the shape only; no tensor is read
    else:
        name = name or _PRESET_MODELS.get(cfg.preset, "")
        if not name:
            raise UserError(f"config preset {cfg.preset!r} with weights {weights!r}: pass --model <preset>")
        try:
            mc = presets.get_preset(name)
        except ValueError as exc:
            raise UserError(f"--model: {exc}") from None
    return mc.replace(param_dtype=cfg.model.dtype, dtype=cfg.model.dtype, remat=bool(cfg.model.remat),
                      scan_layers=bool(cfg.model.get("scan_layers", True)))


def main(argv=None) -> int:
    args = _args(argv)
    from socialalign_jax.errors import UserError, cli_main
    from socialalign_jax import plan as plan_lib

    def run():
        try:
            sizes = plan_lib.parse_mesh(args.mesh)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        n = math.prod(sizes.values())
        # Fake CPU devices must be requested before jax initialises its backend.
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax

        from socialalign_jax import optim
        from socialalign_jax.mesh import make_mesh
        from socialalign_jax.train.loop import lora_config, loss_config

        if jax.device_count() != n:
            raise UserError(f"--mesh {args.mesh} needs {n} devices but jax has {jax.device_count()} "
                            "(was jax imported before XLA_FLAGS was set?)")
        cfg = _load_config(args.config)
        mc = _model_config(cfg, args.model)
        batch = args.batch or int(cfg.data.events_per_batch) * int(cfg.data.cases_per_event)
        seq = args.seq or int(cfg.data.max_length)
        optimizer, _ = optim.make_optimizer(dict(cfg.optim.to_dict(), total_steps=1000))
        mesh = make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"])
        try:
            result = plan_lib.plan_train_step(mc, lora_config(cfg), loss_config(cfg), optimizer, mesh, batch, seq,
                                              compile_step=not args.no_compile)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        print(f"model {mc.family} L={mc.num_layers} D={mc.hidden_size} F={mc.intermediate_size} "
              f"V={mc.vocab_size} dtype={mc.dtype} remat={mc.remat}; config {args.config}")
        print(result.format())
        return 0

    cli_main(run)


if __name__ == "__main__":
    main()
