"""The first thing to run on a lent GPU: does our bf16 code agree with float32, then how fast is it.

    python3 benchmarks/device_check.py --out OUT/device_check.jsonl --sections env,agree
    python3 benchmarks/device_check.py --out OUT/device_check.jsonl --sections layer,train,decode --preset qwen2.5-0.5b
    python3 benchmarks/device_check.py --smoke --out OUT/device_check.jsonl   # every section, tiny, on the CPU

Driven by benchmarks/device_check.sh (one call on the lent machine, each section under its own
time limit). Every section appends one JSON line to --out as soon as it ends, pass or fail, so
a timeout keeps what finished:
- env: versions, the card (nvidia-smi), its dense bf16 peak (train/flops.py);
- agree: a tiny model, bf16 on the accelerator against float32 on the host CPU of the same
  process (`jax.devices("cpu")`): forward logits (both fused-base branches), the loss and the
  adapter gradients, one real train step, and greedy decoding (both layer-loop branches) with
  every emitted token certified by the float32 full forward. Seconds, so a broken port fails
  before any benchmark compiles;
- layer / train / decode: benchmarks/gpu_bench.py's sections at a preset's layer shapes, ours
  vs PyTorch on the same card (train includes plain LoRA and MFU against the card's peak).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SECTIONS = ("env", "agree", "layer", "train", "decode")
# Tolerances of the tiny agreement check, relative to the float32 reference's max |value| (see
# gpu_bench.BF16_RTOL for why a few percent): logits and decode margins at BF16_RTOL-scale, the
# loss (a mean over tokens, where rounding averages out) tighter, gradients (back through every
# layer in bf16) by relative L2 at 3x.
LOGITS_RTOL = 3e-2
LOSS_RTOL = 1e-2
GRAD_REL_L2 = 9e-2
DECODE_MARGIN = 6e-2  # f32 logit of each bf16-chosen token within this x max|logit| of the f32 best


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON lines file, appended to after every section")
    p.add_argument("--sections", default="env,agree", help=f"comma-separated, of {','.join(SECTIONS)}")
    p.add_argument("--preset", default="qwen2.5-0.5b", help="layer shapes of the benchmark sections")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--resp", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--smoke", action="store_true", help="all sections at tiny shapes on the CPU")
    args = p.parse_args(argv)
    if args.smoke:
        args.sections = ",".join(SECTIONS) if args.sections == "env,agree" else args.sections
        args.preset, args.layers, args.batch, args.seq, args.resp = "tiny-qwen2", 1, 2, 32, 8
        args.repeats, args.prompt, args.new = 1, 8, 4
        os.environ["JAX_PLATFORMS"] = "cpu"
    bad = [s for s in args.sections.split(",") if s not in SECTIONS]
    if bad:
        p.error(f"--sections: unknown {bad}; known: {','.join(SECTIONS)}")
    return args


def gpu_name() -> str:
    """The card's name from nvidia-smi ('' without one): what the bf16 peak is looked up by."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout.strip().splitlines()[0].split(",")[0].strip() if r.returncode == 0 and r.stdout.strip() else ""


def section_env() -> dict:
    import importlib.metadata as md

    import jax

    from socialalign_jax.train import flops

    vers = {}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "einops", "torch", "transformers", "peft",
                 "numpy", "ml-collections"):
        try:
            vers[name] = md.version(name)
        except md.PackageNotFoundError:
            vers[name] = None
    card = gpu_name()
    dev = jax.devices()[0]
    return {"python": platform.python_version(), "versions": vers, "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()], "device_kind": dev.device_kind, "nvidia_smi_name": card,
            "bf16_peak_flop_s": flops.peak_flops_for(card) if card else flops.peak_flops_for(dev.device_kind)}


# ------------------------------------------------------------------ agree: bf16 on the card vs float32 on the host


def _rel_max(got, want) -> float:
    import numpy as np
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _rel_l2(got, want) -> float:
    import numpy as np
    got, want = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def section_agree() -> dict:
    """Tiny shapes (2 layers, D 64, vocab 512): each check names its measured error and bound."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from benchmarks import common, train_step as ts
    from socialalign_jax.model import sampling
    from socialalign_jax.model import decoder, pac_lora
    from socialalign_jax.model.presets import get_preset
    from socialalign_jax.train import step as step_lib

    acc = jax.devices()[0]
    try:
        host = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu: the float32 reference runs on the card
        host = acc
    cfg32 = get_preset("tiny-qwen2", vocab_size=512)
    cfg16 = cfg32.replace(dtype="bfloat16", param_dtype="bfloat16")
    b, s, resp = 4, 32, 8
    params32 = jax.device_put(common.init_params(cfg32), host)
    params16 = jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params32), acc)
    lc = pac_lora.LoraConfig(dropout=0.1)
    adapters = common.random_adapters(cfg32, lc)  # float32 on both sides, B != 0
    ad_host, ad_acc = jax.device_put(adapters, host), jax.device_put(adapters, acc)
    batch = ts.make_batch(b, s, resp, vocab=cfg32.vocab_size)
    b_host, b_acc = jax.device_put(batch, host), jax.device_put(batch, acc)
    checks, failed = {}, []
    t0 = time.time()

    def check(name, value, bound):
        print(f"device_check: agree {name} = {value:.3g} (bound {bound:g}) at {time.time() - t0:.0f} s",
              file=sys.stderr, flush=True)
        checks[name] = {"value": value, "bound": bound}
        if not value <= bound:
            failed.append(name)

    # forward logits, each fused-base branch on the card against the unfused float32 reference
    def fwd(params, ads, bt, cfg, lcf):
        return decoder.forward(params, bt["input_ids"], cfg, attention_mask=bt["attention_mask"], adapters=ads,
                               lora_cfg=lcf, spans=(bt["user_end"], bt["news_end"])).logits
    ref_fwd = jax.jit(functools.partial(fwd, cfg=cfg32, lcf=_lc(lc, "never")))
    ref = np.asarray(ref_fwd(params32, ad_host, b_host))
    for fuse in ("always", "never"):
        got = jax.jit(functools.partial(fwd, cfg=cfg16, lcf=_lc(lc, fuse)))(params16, ad_acc, b_acc)
        check(f"forward_logits_fuse_{fuse}_rel_max", _rel_max(got, ref), LOGITS_RTOL)
    # each attention path on the card (model.attention; 'auto' above is cuDNN on a GPU when the
    # config is one cuDNN takes, decided on the host by model/backend.py): a refusal by cuDNN of
    # the explicit 'cudnn' is recorded here, not failed; it is what the host-side check must know.
    attention = {}
    for impl in ("einsum", "cudnn" if acc.platform == "gpu" else "xla"):
        try:
            got = jax.jit(functools.partial(fwd, cfg=cfg16.replace(attention=impl), lcf=_lc(lc, "never")))(
                params16, ad_acc, b_acc)
        except Exception as e:  # noqa: BLE001 - what cuDNN refuses is the finding
            attention[impl] = f"refused: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            continue
        attention[impl] = "ran"
        check(f"forward_logits_attention_{impl}_rel_max", _rel_max(got, ref), LOGITS_RTOL)

    # loss and adapter gradients (deterministic), then one real step (dropout on, state donated)
    loss_cfg = step_lib.LossConfig(max_response_tokens=resp)

    def loss_grad(params, ads, bt, cfg):
        f = functools.partial(step_lib.compute_loss, model_cfg=cfg, lora_cfg=lc, loss_cfg=loss_cfg, deterministic=True)
        (loss, _), g = jax.value_and_grad(f, has_aux=True)(ads, params, bt, jax.random.PRNGKey(0))
        return loss, g
    l32, g32 = jax.jit(functools.partial(loss_grad, cfg=cfg32))(params32, ad_host, b_host)
    l16, g16 = jax.jit(functools.partial(loss_grad, cfg=cfg16))(params16, ad_acc, b_acc)
    check("loss_rel", abs(float(l16) - float(l32)) / abs(float(l32)), LOSS_RTOL)
    flat = lambda g: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(g)])  # noqa: E731
    check("adapter_grads_rel_l2", _rel_l2(flat(g16), flat(g32)), GRAD_REL_L2)
    opt = optax.adamw(1e-3)
    state = jax.device_put(step_lib.init_train_state(adapters, opt), acc)
    step = jax.jit(step_lib.make_train_step(cfg16, lc, loss_cfg, opt), donate_argnums=(1,))
    new_state, metrics = step(params16, state, b_acc, jax.random.PRNGKey(1))
    moved = _rel_l2(flat(new_state["adapters"]), flat(adapters))
    check("train_step_finite_loss", 0.0 if np.isfinite(float(metrics["loss"])) else 1.0, 0.0)
    checks["train_step_adapter_change_rel_l2"] = moved
    if not 0 < moved < 1:
        failed.append("train_step_adapter_change_rel_l2")

    # greedy decoding in bf16 on the card (both layer loops), every token certified by float32
    p_len, pad, new = 12, 3, 8
    prompt_ids = np.asarray(batch["input_ids"][:2, :p_len]).copy()
    mask = np.ones_like(prompt_ids)
    mask[1, :pad] = 0  # row 1 left-padded
    prompt_ids[1, :pad] = 0
    spans = (np.array([3, 5], np.int32), np.array([6, 8], np.int32))
    decoded = {}
    for loop in ("scan", "unrolled"):
        scfg = sampling.SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=new, stop_tokens=(),
                                       layer_loop=loop)
        out = sampling.generate(params16, ad_acc, jax.device_put(prompt_ids, acc), jax.device_put(mask, acc), cfg16,
                                lc, scfg, jax.device_put(spans, acc), jax.random.PRNGKey(0))
        toks = np.asarray(out.tokens)
        decoded[loop] = toks.tolist()
        # float32 full forward over each row's real prompt + its tokens, both rows right-padded to
        # one shape: the logits after prompt + t tokens chose token t.
        full = np.zeros((2, p_len + new), np.int32)
        fmask = np.zeros_like(full)
        lens = []
        for row in range(2):
            seq = np.concatenate([prompt_ids[row][mask[row] > 0], toks[row]])
            full[row, :len(seq)], fmask[row, :len(seq)] = seq, 1
            lens.append(len(seq) - new)
        lg = np.asarray(ref_fwd(params32, ad_host, jax.device_put(
            {"input_ids": full, "attention_mask": fmask, "user_end": spans[0], "news_end": spans[1]}, host)))
        worst = 0.0
        for row in range(2):
            for t in range(new):
                row_lg = lg[row, lens[row] - 1 + t]
                worst = max(worst, float((row_lg.max() - row_lg[toks[row, t]]) / np.abs(row_lg).max()))
        check(f"decode_{loop}_worst_margin_rel", worst, DECODE_MARGIN)
    return {"ok_checks": not failed, "failed": failed, "checks": checks, "decoded": decoded, "attention": attention,
            "shape": f"tiny-qwen2 vocab 512 ({cfg32.num_layers} layers, D {cfg32.hidden_size}), batch {b} x {s}",
            "reference": f"float32 on {host.device_kind}", "tested": f"bfloat16 on {acc.device_kind}"}


def _lc(lc, fuse):
    import dataclasses
    return dataclasses.replace(lc, fuse_base=fuse)


# ------------------------------------------------------------------ the benchmark sections (gpu_bench.py)


def _bench(name: str, args) -> dict:
    import jax

    from benchmarks import common, gpu_bench
    from socialalign_jax.model.presets import get_preset
    from socialalign_jax.train import flops

    torch = common.setup_torch()
    dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if not args.smoke and (dev != "cuda" or jax.default_backend() != "gpu"):
        raise RuntimeError(f"needs a CUDA GPU for both jax (backend {jax.default_backend()!r}) and torch "
                           f"(cuda available: {torch.cuda.is_available()}); --smoke runs on the CPU")
    cfg = get_preset(args.preset, num_layers=args.layers, dtype="bfloat16", param_dtype="bfloat16")
    if args.smoke:  # a 512-token vocabulary: the smoke checks the code path, not the LM head's size
        cfg = cfg.replace(vocab_size=512)
    if name == "layer":
        return gpu_bench.bench_layer(torch, dev, cfg.hidden_size, cfg.intermediate_size, args.batch, args.seq,
                                     max(args.repeats * 3, 1))
    if name == "train":
        r = gpu_bench.bench_train_step(torch, dev, cfg, args.batch, args.seq, args.resp, args.repeats)
        card = gpu_name()
        peak = flops.peak_flops_for(card) if card else None
        r.update(device=card or jax.devices()[0].device_kind, bf16_peak_flop_s=peak,
                 mfu=r["ours_flop_s"] / peak if peak else None)
        return r
    return gpu_bench.bench_decode(torch, dev, cfg, args.prompt, args.new, max(args.repeats // 2, 1))


def main(argv=None) -> int:
    args = _args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the card
    import warnings
    warnings.filterwarnings("ignore")
    if args.smoke:  # compile time dominates at tiny shapes on the CPU (as in tests/conftest.py)
        import jax
        jax.config.update("jax_disable_most_optimizations", True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    status = 0
    for name in args.sections.split(","):
        t0 = time.time()
        rec = {"section": name, "preset": args.preset if name in ("layer", "train", "decode") else None,
               "smoke": args.smoke}
        try:
            if name == "env":
                rec.update(section_env())
            elif name == "agree":
                rec.update(section_agree())
            else:
                rec.update(_bench(name, args))
            rec["ok"] = bool(rec.pop("ok_checks", True))
        except Exception as exc:  # noqa: BLE001 - recorded, then the next section runs
            rec.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                       traceback=traceback.format_exc(limit=6))
        rec["seconds"] = round(time.time() - t0, 1)
        status |= 0 if rec["ok"] else 1
        line = json.dumps(rec, default=float)
        with open(args.out, "a") as f:
            f.write(line + "\n")
        verdict = "ok" if rec["ok"] else f"FAILED: {rec.get('error') or rec.get('failed')}"
        print(f"device_check: {name} {verdict} ({rec['seconds']} s)", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
