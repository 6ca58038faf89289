"""Per-device memory of the training step (and the decode loop) on a mesh, before renting the mesh.

    python launch/plan.py --config configs/weibo.py:7b --mesh fsdp=8                 # fake CPU devices
    python launch/plan.py --config configs/weibo.py:7b --topology v5p-128            # the TPU compiler
    python launch/plan.py --config configs/weibo.py:7b --topology v5e-256 --mesh tensor=2,fsdp=-1 --batch 256
    python launch/plan.py --config configs/weibo.py:1.5b --topology v5e-8 --sweep    # largest batch per layout
    python launch/plan.py --config configs/weibo.py:7b --topology v5e-8 --step decode --batch 8

No weights are read and nothing is allocated: the step is compiled ahead of time on abstract
shapes. Without --topology it compiles for data x fsdp x tensor fake CPU devices (XLA:CPU's
buffer assignment: an estimate of the accelerator's activation peak). With --topology NAME
libtpu describes that TPU slice on this host and the TPU compiler itself compiles the step for
it (as maxtext's train_compile.py does): its memory_analysis() is what each chip would hold,
printed against the chip's HBM with whether it fits. Needs `pip install -e ".[tpu]"`.
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from socialalign_jax.core.cli_setup import quiet_startup  # noqa: E402

quiet_startup()  # before jax and transformers: no start-up lines (e.g. "PyTorch was not found") before ours

# The model shape of each configs/weibo.py preset whose weights are given at run time.
_PRESET_MODELS = {"7b": "qwen2.5-7b", "1.5b": "qwen2.5-1.5b", "0.5b": "qwen2.5-0.5b"}


from absl import flags  # noqa: E402

# Its own FlagValues, not absl's global FLAGS: tests call main() in-process (core/cli_setup.parse_flags).
FLAGS = flags.FlagValues()
flags.DEFINE_string("config", "configs/weibo.py:7b", "Config file[:preset].", flag_values=FLAGS)
flags.DEFINE_string("mesh", "", "data=N,fsdp=N,tensor=N; one axis may be -1 (default: fsdp=8 on fake CPU devices, "
                    "fsdp=<all chips> with --topology).", flag_values=FLAGS)
flags.DEFINE_string("topology", "", "A TPU slice (v5e-8, v5e-256, v4-32, v5p-128, v6e-64, ...): compile with the "
                    "TPU compiler for it (needs libtpu).", flag_values=FLAGS)
flags.DEFINE_enum("step", "train", ["train", "decode", "both"],
                  "What to compile: the train step, the decode loop (sampling.generate), or both.", flag_values=FLAGS)
flags.DEFINE_bool("sweep", False, "With --topology: try mesh layouts and batch sizes and report the largest global "
                  "batch that fits per layout.", flag_values=FLAGS)
flags.DEFINE_string("model", "", "Model preset (model/presets.py) instead of the config's weights.", flag_values=FLAGS)
flags.DEFINE_integer("batch", 0, "Global batch (default: the config's G x M).", flag_values=FLAGS)
flags.DEFINE_integer("seq", 0, "Sequence length (default: data.max_length); decode: the prompt's.", flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 256, "Decode: tokens generated after the prompt.", flag_values=FLAGS)
flags.DEFINE_bool("compile", True, "Compile the step for its memory figures (--nocompile: only the exact "
                  "per-tree figures).", flag_values=FLAGS)


def _args(argv):
    from socialalign_jax.core.cli_setup import parse_flags

    return parse_flags(FLAGS, argv, "plan.py", __doc__)


def _model_config(cfg, name: str):
    from socialalign_jax.core.errors import UserError
    from socialalign_jax.model import presets
    from socialalign_jax.weights import hf

    weights = str(cfg.model.weights)
    if not name and weights.startswith("random:"):
        name = weights.split(":", 1)[1]
    if not name and weights.startswith("hf:") and os.path.isfile(os.path.join(weights[3:], "config.json")):
        mc, _ = hf.read_config(weights[3:])  # the shape only; no tensor is read
    else:
        name = name or _PRESET_MODELS.get(cfg.preset, "")
        if not name:
            raise UserError(f"config preset {cfg.preset!r} with weights {weights!r}: pass --model <preset>")
        try:
            mc = presets.get_preset(name)
        except ValueError as exc:
            raise UserError(f"--model: {exc}") from None
    return cfg.model.apply_to(mc)


def main(argv=None) -> int:
    args = _args(argv)
    from socialalign_jax.core.errors import UserError, cli_main
    from socialalign_jax.tools import plan as plan_lib

    def run():
        for name in ("batch", "seq", "max_new_tokens"):
            if args[name].value < (0 if name != "max_new_tokens" else 1):
                default = " (or 0 for the config's)" if name != "max_new_tokens" else ""
                raise UserError(f"--{name}: {args[name].value}: expected a positive number{default}")
        try:
            sizes = plan_lib.parse_mesh(args.mesh or ("fsdp=-1" if args.topology else "fsdp=8"))
            tpu = plan_lib.tpu_slice(args.topology) if args.topology else None
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if args.sweep and tpu is None:
            raise UserError("--sweep needs --topology (fake CPU devices have no memory limit to fit)")
        os.environ["JAX_PLATFORMS"] = "cpu"  # the host runs nothing; a TPU slice is only a compile target
        if tpu is not None:
            if not plan_lib.libtpu_available():
                raise UserError(plan_lib.LIBTPU_HINT)
            plan_lib.quiet_libtpu_env(tpu)  # before jax starts: see its docstring
        else:
            if plan_lib.libtpu_available():  # installed but unused here: keep its start-up warnings quiet
                plan_lib.quiet_libtpu_env()
            if -1 in sizes.values():
                raise UserError("--mesh: -1 needs --topology (on fake CPU devices give every axis a size)")
            n = math.prod(sizes.values())
            # Fake CPU devices must be requested before jax initialises its backend.
            xla_flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                         if "force_host_platform_device_count" not in f]
            os.environ["XLA_FLAGS"] = " ".join(xla_flags + [f"--xla_force_host_platform_device_count={n}"])
        import jax

        from socialalign_jax.parallel.mesh import make_mesh
        from socialalign_jax.runs.restore import mesh_rules
        from socialalign_jax.train import optim

        if tpu is not None:
            devices = plan_lib.tpu_devices(tpu)
        else:
            devices = jax.devices()
            if len(devices) != n:
                raise UserError(f"--mesh {args.mesh} needs {n} devices but jax has {len(devices)} "
                                "(was jax imported before XLA_FLAGS was set?)")
        from socialalign_jax.core.cli_setup import load_config_file
        from socialalign_jax.runs.run_config import as_run_config

        cfg = as_run_config(load_config_file(args.config), source=args.config)  # the boundary
        rules = mesh_rules(cfg)  # the config's mesh.rules, as training applies them
        mc = _model_config(cfg, args.model)
        lc = cfg.lora
        batch = args.batch or cfg.data.events_per_batch * cfg.data.cases_per_event
        seq = args.seq or cfg.data.max_length
        optimizer, _ = optim.make_optimizer(cfg.optim, 1000)
        target = f"{tpu.name} ({tpu.topology}, {len(devices)} x {devices[0].device_kind})" if tpu else "fake CPU devices"
        print(f"model {mc.family} L={mc.num_layers} D={mc.hidden_size} F={mc.intermediate_size} "
              f"V={mc.vocab_size} dtype={mc.dtype} remat={mc.remat}; config {args.config}; target {target}", flush=True)

        def mesh_for(data, fsdp, tensor):
            try:
                return make_mesh(data, fsdp, tensor, devices=devices)
            except ValueError as exc:
                raise UserError(f"--mesh: {exc}") from None

        def one(mesh, b, step):
            try:
                if step == "train":
                    return plan_lib.plan_train_step(mc, lc, cfg.loss, optimizer, mesh, b, seq,
                                                    compile_step=args.compile, rules=rules)
                return plan_lib.plan_decode(mc, lc if lc.targets else None, mesh, b, seq, args.max_new_tokens,
                                            compile_step=args.compile, rules=rules)
            except ValueError as exc:
                raise UserError(str(exc)) from None

        steps = ("train", "decode") if args.step == "both" else (args.step,)
        if args.sweep:
            for step in steps:
                rows = plan_lib.sweep(lambda m, b: one(m, b, step), plan_lib.sweep_layouts(len(devices), mc.num_heads),
                                      mesh_for, log=lambda text: print(text, flush=True))
                print(f"sweep ({step}, seq {seq}): largest global batch that fits per layout")
                for r in rows:
                    layout = ",".join(f"{k}={v}" for k, v in r["layout"].items())
                    print(f"  {layout:<28} max batch {r['max_batch']:>5}   peak {r['peak_gib']} GiB")
            return 0
        mesh = mesh_for(sizes["data"], sizes["fsdp"], sizes["tensor"])
        for step in steps:
            print(one(mesh, batch, step).format(), flush=True)
        return 0

    cli_main(run)


if __name__ == "__main__":
    main()
