"""The GPU variant of benchmarks/run.py: bfloat16, ours (JAX) vs PyTorch on the same card (run by gpu.sh).

    python benchmarks/gpu_bench.py --preset qwen2.5-0.5b [--layers 4 --batch 8 --seq 1024] [--out FILE] [--smoke]

One JSON line per call with, for one preset's layer shapes (a few layers, the real vocabulary):
  1. the PAC-LoRA layer at d_model -> d_ff, forward + backward: ours vs benchmarks/torch_ref's
     original-style module (run.py section 1), time and memory;
  2. the training step: ours vs HF Qwen2 + torch_ref + AdamW (section 2), the step with plain
     LoRA r 8 for the cost of the method (section 3) and MFU against the card's dense bf16 peak
     (train/flops.py's table; section 5 measures a CPU matmul instead, meaningless here);
  3. greedy decoding with the KV cache at batch 1 and 8: `sampling.generate` vs HF `generate` (section 4).
Compute is bfloat16 on both sides with float32 adapters (ours casts them inside the matmuls,
PyTorch runs them under `torch.autocast`), since that is how either side would train on a GPU.
Every comparison is checked for agreement before it is timed and aborts with a message if the
two sides disagree beyond bfloat16 rounding. --smoke runs every part at tiny shapes on the CPU.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Agreement tolerance, relative to the largest magnitude of the reference tensor. A bfloat16 value
# carries 8 significant bits (relative rounding 2^-9 = 0.2%); both sides round every intermediate
# (activations, matmul outputs) to bf16 in different places and orders, and errors compound through
# the layers, so a few percent of the max is where a correct pair lands while a wrong one (a missing
# gate, a transposed expert, a wrong scale) is off by O(1) of it. Measured on the CPU at Qwen2.5-0.5B
# layer shapes: 0.5-0.9% for the layer's outputs and gradients, 1.6% for decode logits.
BF16_RTOL = 3e-2
# How many decoded tokens the prefix-agreement figure looks at.
DECODE_HEAD = 8


class Disagreement(AssertionError):
    """Ours and PyTorch computed different things: nothing after this would be worth timing."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="qwen2.5-0.5b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="train step (and layer) batch")
    p.add_argument("--seq", type=int, default=1024, help="train step (and layer) sequence length")
    p.add_argument("--resp", type=int, default=256, help="response tokens per row (LM loss positions)")
    p.add_argument("--repeats", type=int, default=10, help="timed train steps per side")
    p.add_argument("--layer-repeats", type=int, default=30, help="timed layer fwd+bwd calls per side")
    p.add_argument("--prompt", type=int, default=128, help="decode prompt length")
    p.add_argument("--new", type=int, default=64, help="decode: new tokens")
    p.add_argument("--decode-repeats", type=int, default=5)
    p.add_argument("--out", default="", help="also append the JSON line to this file")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (debugging at small shapes)")
    p.add_argument("--smoke", action="store_true", help="every part at tiny shapes on the CPU (a check that it works)")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.layers, args.batch, args.seq, args.resp = "tiny-qwen2", 1, 2, 64, 16
        args.repeats, args.layer_repeats, args.prompt, args.new, args.decode_repeats = 2, 2, 16, 8, 1
        args.allow_cpu = True
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # Both frameworks share the card: JAX would otherwise reserve 75% of its memory at start-up.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import warnings
    warnings.filterwarnings("ignore")

    import jax
    import transformers

    from benchmarks import common
    from socialalign_jax.model.presets import get_preset
    from socialalign_jax.train import flops

    transformers.logging.set_verbosity_error()
    torch = common.setup_torch()
    dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    print(f"gpu_bench: jax {jax.__version__} {jax.devices()} | torch {torch.__version__} on {dev}", file=sys.stderr)
    if not args.allow_cpu and (dev != "cuda" or jax.default_backend() != "gpu"):
        print(f"gpu_bench: needs a CUDA GPU visible to both jax (backend {jax.default_backend()!r}) and torch "
              f"(cuda available: {torch.cuda.is_available()}); install jax[cuda12] and a CUDA torch, "
              "or pass --smoke / --allow-cpu", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name(0) if dev == "cuda" else jax.devices()[0].device_kind
    cfg = get_preset(args.preset, num_layers=args.layers, dtype="bfloat16", param_dtype="bfloat16")
    t0 = time.time()

    def section(name, fn, *a):
        t = time.time()
        r = fn(torch, dev, *a)
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()  # hand the cached blocks back before the next section's JAX buffers
        print(f"gpu_bench: {name} done in {time.time() - t:.0f} s: {json.dumps(r)}", file=sys.stderr, flush=True)
        return r

    try:
        layer = section("layer", bench_layer, cfg.hidden_size, cfg.intermediate_size, args.batch, args.seq,
                        args.layer_repeats)
        train = section("train_step", bench_train_step, cfg, args.batch, args.seq, args.resp, args.repeats)
        decode = section("decode", bench_decode, cfg, args.prompt, args.new, args.decode_repeats)
    except Disagreement as e:
        print(f"gpu_bench ({args.preset}): ABORTED, ours and PyTorch disagree: {e}", file=sys.stderr)
        return 1

    peak = flops.peak_flops_for(card) or flops.peak_flops_for(jax.devices()[0].device_kind)
    out = {
        "preset": args.preset, "device": card, "jax_device_kind": jax.devices()[0].device_kind, "torch_device": dev,
        "layers": args.layers, "precision": "bfloat16 compute, bfloat16 base weights, float32 adapters",
        "layer_speedup_vs_torch": layer["speedup"], "layer_peak_memory_ratio_vs_torch": layer["peak_memory_ratio"],
        "train_step_speedup_vs_torch": train["speedup"], "pac_over_lora_step_ratio": train["pac_over_lora"],
        "decode_speedup_vs_hf_b1": decode["b1"]["speedup"], "decode_speedup_vs_hf_b8": decode["b8"]["speedup"],
        "gpu_mfu": train["ours_flop_s"] / peak if peak else None, "bf16_peak_flop_s": peak,
        "layer": layer, "train_step": train, "decode": decode,
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "seconds": time.time() - t0,
    }
    line = json.dumps(out)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


# ------------------------------------------------------------------ helpers


def _sync(torch, dev):
    """Timing a CUDA call needs its kernels finished, not just queued."""
    if dev == "cuda":
        torch.cuda.synchronize()


def _agree(what: str, diffs: dict, scales: dict, rtol: float | None = None) -> None:
    """Raise Disagreement when any max |ours - torch| exceeds rtol (BF16_RTOL) of that tensor's max |torch|."""
    rtol = BF16_RTOL if rtol is None else rtol
    bad = {k: (v, scales[k]) for k, v in diffs.items() if not v <= rtol * max(float(scales[k]), 1e-6)}
    if bad:
        raise Disagreement(f"{what}: max |diff| vs max |value| beyond {rtol:g}: {bad}")


def _bf16_round(np, jnp, a):
    """float32 numpy -> (jax bf16 array, float32 numpy holding exactly the same bf16 values)."""
    j = jnp.asarray(a, jnp.bfloat16)
    return j, np.asarray(j, np.float32)


def _hf_bf16(torch, dev, params, cfg, adapters=None, lc=None):
    """HF Qwen2 on `dev` with our base weights in bf16; with adapters, torch_ref's PAC-LoRA in float32.

    Built in float32 on the host (common.hf_model_from) and cast afterwards: the bf16 values are
    exactly ours, since our params are bf16 already.
    """
    import jax
    import numpy as np
    from benchmarks import common
    from benchmarks.torch_ref import pac_lora as tref

    hf = common.hf_model_from(jax.tree.map(lambda a: np.asarray(a, np.float32), params),
                              cfg.replace(dtype="float32", param_dtype="float32"))
    mods, routing = [], None
    if adapters is not None:
        routing = tref.Routing()
        mods = tref.inject(hf, routing, dropout=lc.dropout)
        tref.load_adapters(hf, adapters)
    hf.requires_grad_(False)  # the base is frozen with or without adapters (decode has none)
    for m in mods:  # ... and only the adapters train
        for name, prm in m.named_parameters():
            if not name.startswith("base."):
                prm.requires_grad_(True)
    hf = hf.to(dev)
    for prm in hf.parameters():  # the frozen base in bf16; adapters (the trainable ones) stay float32
        if not prm.requires_grad:
            prm.data = prm.data.to(torch.bfloat16)
    if adapters is None:  # a float32 baseline would make our bf16 decode look ~2x faster than it is
        assert {prm.dtype for prm in hf.parameters()} == {torch.bfloat16}
    return hf, mods, routing


# ------------------------------------------------------------------ 1. PAC-LoRA layer


def bench_layer(torch, dev, d_in: int, d_out: int, b: int, s: int, repeats: int) -> dict:
    """run.py section 1 (benchmarks/layer.py) in bf16 on `dev`: x [b, s, d_in] -> d_out, fwd + bwd.

    Same construction as layer.py (token routing over user/news/other thirds, B != 0, dropout off
    because the two frameworks' masks differ), with bf16 activations and base weights; the
    memory figures are measured the same way (compiled temp bytes vs saved-for-backward bytes).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from benchmarks import common
    from benchmarks.torch_ref.pac_lora import PacLoraLinear, Routing
    from socialalign_jax.model import modules, pac_lora

    lc = pac_lora.LoraConfig(dropout=0.0)
    rng = np.random.default_rng(0)
    x_j, x_np = _bf16_round(np, jnp, rng.standard_normal((b, s, d_in)))  # [b, s, d_in]
    ct_j, ct_np = _bf16_round(np, jnp, rng.standard_normal((b, s, d_out)))  # cotangent of y [b, s, d_out]
    w0_j, w0_np = _bf16_round(np, jnp, 0.02 * rng.standard_normal((d_in, d_out)))
    bias_j, bias_np = _bf16_round(np, jnp, 0.02 * rng.standard_normal((d_out,)))
    ad = modules.init_linear_adapter(jax.random.PRNGKey(0), 1, d_in, d_out, lc)  # stacked on a layer axis of 1
    ad = jax.tree.map(lambda a: np.asarray(a[0]), ad)  # float32
    ad["B"] = rng.uniform(-0.05, 0.05, ad["B"].shape).astype(np.float32)  # [Eb, r, d_out], float32
    pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    seg = np.where(pos < s // 2, 0, np.where(pos < 3 * s // 4, 1, 2)).astype(np.int32)  # user | news | other

    def fwd_bwd(adapter, x, base, seg, ct):
        route = {"seg": seg, "valid": jnp.ones(seg.shape, bool), "deterministic": True}
        y, vjp = jax.vjp(lambda a, xx: pac_lora.adapted_linear(xx, base, a, lc, route)[0], adapter, x)
        return y, vjp(ct)

    args = jax.device_put((ad, x_j, {"kernel": w0_j, "bias": bias_j}, seg, ct_j))
    compiled = jax.jit(fwd_bwd).lower(*args).compile()
    mem_ours = int(compiled.memory_analysis().temp_size_in_bytes)
    y_j, (g_ad, g_x) = common.block(compiled(*args))

    lin = torch.nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w0_np.T.copy()))
        lin.bias.copy_(torch.from_numpy(bias_np))
    routing = Routing()
    mod = PacLoraLinear(lin, routing, dropout=0.0)
    mod.load_from_jax(ad)
    mod.to(dev)
    mod.base.to(torch.bfloat16)  # frozen base bf16, adapters float32 (autocast casts them per matmul)
    routing.seg = torch.from_numpy(seg).long().to(dev)
    xt = torch.from_numpy(x_np).to(dev, torch.bfloat16).requires_grad_(True)
    ctt = torch.from_numpy(ct_np).to(dev, torch.bfloat16)

    def forward():
        with torch.autocast(dev, dtype=torch.bfloat16):
            return mod(xt)

    def torch_step():
        mod.zero_grad(set_to_none=True)
        xt.grad = None
        y = forward()
        y.backward(ctt)
        _sync(torch, dev)
        return y

    y_t = torch_step()
    f32 = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    ours = {"y": np.asarray(y_j, np.float32), "dA": np.asarray(g_ad["A"]).transpose(0, 2, 1),
            "dB": np.asarray(g_ad["B"]).transpose(0, 2, 1), "dgate_a_w1": np.asarray(g_ad["gate_a"]["w1"]).T,
            "dgate_b_w1": np.asarray(g_ad["gate_b"]["w1"]).T, "dx": np.asarray(g_x, np.float32)}
    theirs = {"y": f32(y_t), "dA": f32(mod.A.grad), "dB": f32(mod.B.grad), "dgate_a_w1": f32(mod.gate_a[0].weight.grad),
              "dgate_b_w1": f32(mod.gate_b[0].weight.grad), "dx": f32(xt.grad)}
    diffs = {k: float(np.abs(ours[k] - theirs[k]).max()) for k in ours}
    scales = {k: float(np.abs(theirs[k]).max()) for k in ours}
    _agree("layer fwd+bwd", diffs, scales)

    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward()
    del y
    mem_torch = sum(saved.values())

    t_ours = common.median_time(lambda: common.block(compiled(*args)), repeats, warmup=3)[0]
    t_torch = common.median_time(torch_step, repeats, warmup=3)[0]
    return {"shape": f"x [{b}, {s}, {d_in}] bf16 -> {d_out}, r {lc.rank}, {lc.num_analyze}x{lc.num_compose} experts",
            "max_abs_diff": diffs, "max_abs": scales, "ours_s": t_ours, "torch_s": t_torch, "speedup": t_torch / t_ours,
            "ours_temp_bytes": mem_ours, "torch_saved_bytes": mem_torch, "peak_memory_ratio": mem_ours / mem_torch}


# ------------------------------------------------------------------ 2. training step


def bench_train_step(torch, dev, cfg, b: int, s: int, resp: int, repeats: int) -> dict:
    """run.py sections 2, 3 and 5 in bf16: ours vs PyTorch step time, PAC-LoRA over LoRA, MFU.

    The agreement check runs both sides deterministically (dropout off, as train_step.py does);
    the timed steps use dropout 0.1 on both. The LoRA and PAC-LoRA steps are timed with
    train_step._ours (jit, state donated), the same code as the CPU benchmark.
    """
    import jax
    import numpy as np
    from benchmarks import common, train_step as ts
    from socialalign_jax.model import pac_lora
    from socialalign_jax.train import flops, step as step_lib

    lc = pac_lora.LoraConfig()
    loss_cfg = step_lib.LossConfig(max_response_tokens=resp)
    params = common.init_params(cfg)  # bf16
    adapters = common.random_adapters(cfg, lc)  # float32, B != 0
    batch = ts.make_batch(b, s, resp, vocab=min(cfg.vocab_size, 150000))
    jbatch = jax.device_put(batch)

    # ---- ours, deterministic, for the agreement check: loss terms and the gradient of layer 0's q B
    loss_fn = functools.partial(step_lib.compute_loss, model_cfg=cfg, lora_cfg=lc, loss_cfg=loss_cfg,
                                deterministic=True)
    (loss, (terms, _)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        adapters, params, jbatch, jax.random.PRNGKey(0))
    ours = {"loss": float(loss), **{k: float(terms[k]) for k in ("lm", "sent", "macro")},
            "dB_q0": np.asarray(grads["layers"]["attn"]["q"]["B"][0]).transpose(0, 2, 1)}  # [Eb, d_out, r]
    del grads

    check, t_torch = _torch_train_step(torch, dev, cfg, lc, params, adapters, batch, ours, repeats)
    if dev == "cuda":
        torch.cuda.empty_cache()  # the PyTorch model is gone: give its blocks back before ours runs
    t_ours = ts._ours(cfg, lc, loss_cfg, params, adapters, jbatch, repeats)
    lc_lora = pac_lora.LoraConfig(num_analyze=1, num_compose=1)
    t_lora = ts._ours(cfg, lc_lora, loss_cfg, params, common.random_adapters(cfg, lc_lora), jbatch, repeats)
    step_flops = flops.train_step_flops(cfg, lc, b, s, resp, lc.num_classes)
    return {"shape": f"{cfg.hidden_size}/{cfg.intermediate_size} layers x {cfg.num_layers}, vocab {cfg.vocab_size}, "
                     f"batch {b} x {s}, {resp} response tokens/row",
            "check": check, "ours_s": t_ours, "torch_s": t_torch, "speedup": t_torch / t_ours,
            "ours_tok_s": b * s / t_ours, "torch_tok_s": b * s / t_torch, "lora_s": t_lora,
            "pac_over_lora": t_ours / t_lora, "step_flops": step_flops, "ours_flop_s": step_flops / t_ours}


def _torch_train_step(torch, dev, cfg, lc, params, adapters, batch, ours: dict, repeats: int):
    """The PyTorch side of the step: check against `ours` (deterministic), then time it -> (check, seconds).

    HF Qwen2 (bf16 base) + torch_ref PAC-LoRA (float32) in the seven projections, AdamW on the
    adapters and head, under bf16 autocast. In a function of its own so that the model, its
    optimizer state and activations are freed when it returns, before ours is timed.
    """
    import numpy as np
    from benchmarks import common, train_step as ts
    from benchmarks.torch_ref import pac_lora as tref

    hf, mods, routing = _hf_bf16(torch, dev, params, cfg, adapters, lc)
    head = torch.nn.Linear(cfg.hidden_size, lc.num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(np.asarray(adapters["head"]["kernel"]).T.copy()))
        head.bias.copy_(torch.from_numpy(np.asarray(adapters["head"]["bias"])))
    head.to(dev)
    trainable = [q for m in mods for q in m.parameters() if q.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
    tbatch = {k: torch.from_numpy(v).to(dev) for k, v in batch.items()}  # placed once, as ours is
    prompt_len = int(batch["prompt_len"][0])

    def loss_fn():
        with torch.autocast(dev, dtype=torch.bfloat16):
            return ts.torch_objective(torch, hf, head, tbatch, prompt_len, routing, tref.segment_ids)

    hf.eval()  # dropout off for the check
    loss, (lm, sent, macro) = loss_fn()
    loss.backward()
    g_b = mods[0].B.grad.float().cpu().numpy()  # layer 0, q: [Eb, d_out, r]
    check = {"loss": [ours["loss"], float(loss)], "lm": [ours["lm"], float(lm)], "sent": [ours["sent"], float(sent)],
             "macro": [ours["macro"], float(macro)],
             "dB_q0_max_abs_diff": float(np.abs(ours["dB_q0"] - g_b).max()), "dB_q0_max_abs": float(np.abs(g_b).max()),
             "dB_q0_rel_l2_err": float(np.linalg.norm(ours["dB_q0"] - g_b) / max(np.linalg.norm(g_b), 1e-30))}
    # The loss terms are means (CE over tokens, over rows): bf16 rounding averages out, so they get
    # a tighter bound than the gradient. The macro JSD is in [0, ln 2]: an absolute bound.
    _agree("train step loss terms", {k: abs(check[k][0] - check[k][1]) for k in ("loss", "lm", "sent")},
           {k: abs(check[k][1]) for k in ("loss", "lm", "sent")}, rtol=BF16_RTOL / 3)
    _agree("train step macro JSD (absolute)", {"macro": abs(check["macro"][0] - check["macro"][1])}, {"macro": 1.0},
           rtol=BF16_RTOL / 3)
    # The gradient went backward through every layer in bf16: measured on the CPU at 0.5B shapes,
    # 2.5% relative L2 error (2.9% max-abs) with 4 layers; a wrong one (scale, routing) is O(1) off.
    _agree("train step gradient (layer 0, q, B; relative L2)", {"dB_q0": check["dB_q0_rel_l2_err"]},
           {"dB_q0": 1.0}, rtol=3 * BF16_RTOL)

    hf.train()  # adapter dropout 0.1 on, as ours while timing (HF's own attention dropout is 0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_fn()
        loss.backward()
        opt.step()
        _sync(torch, dev)

    return check, common.median_time(step, repeats, warmup=2)[0]


# ------------------------------------------------------------------ 3. decoding


def bench_decode(torch, dev, cfg, prompt: int, new: int, repeats: int) -> dict:
    """run.py section 4 in bf16: greedy decode with the KV cache, ours vs HF, batch 1 and 8.

    Why not a token-agreement threshold as on the CPU (95% in float32): with random weights the
    top two logits of a 150k vocabulary are often closer than bf16 resolves (HF's logits are
    bf16-rounded, ours are accumulated in float32), one flip changes every later token, and a
    correct pair measured on the CPU at Qwen2.5-0.5B shapes (2 layers, batch 8, bf16) agreed on
    only 70% of the first 8 tokens in one run (three of 8 rows split, at steps 1, 1 and 3; another
    run split one row, at a margin of 0.1% of max |logit|).
    So the check certifies each divergence instead: at a row's first differing step,
    HF's own full forward (no cache) over the shared prefix must rank our token within
    2 * BF16_RTOL * max |logit| of its best one, i.e. within what two bf16 forwards can differ
    by at two logits. A broken decoder (wrong cache slot, positions, masking) picks tokens
    whose reference logit is O(max |logit|) below the best and fails it. The agreement
    fractions are reported alongside.
    """
    import jax
    import numpy as np
    from benchmarks import common
    from socialalign_jax.model import sampling

    params = common.init_params(cfg)  # bf16, no adapters: HF's generate would route decoded tokens differently
    hf, _, _ = _hf_bf16(torch, dev, params, cfg)
    hf.eval()
    scfg = sampling.SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=new, stop_tokens=())
    out = {"shape": f"{cfg.hidden_size}/{cfg.intermediate_size} layers x {cfg.num_layers}, vocab {cfg.vocab_size}, "
                    f"prompt {prompt}, {new} new tokens, bf16",
           "hf_param_dtypes": sorted({str(prm.dtype) for prm in hf.parameters()})}
    for b in (1, 8):
        ids = np.random.default_rng(b).integers(0, min(150000, cfg.vocab_size), (b, prompt)).astype(np.int32)
        mask = np.ones_like(ids)
        spans = (np.zeros((b,), np.int32), np.zeros((b,), np.int32))
        args = jax.device_put((params, None, ids, mask))
        ids_t = torch.from_numpy(ids).long().to(dev)
        mask_t = torch.from_numpy(mask).long().to(dev)

        def ours():
            return common.block(sampling.generate(*args, cfg, None, scfg, spans, jax.random.PRNGKey(0)).tokens)

        def theirs():
            with torch.no_grad():
                r = hf.generate(ids_t, attention_mask=mask_t, do_sample=False, max_new_tokens=new,
                                min_new_tokens=new, use_cache=True, eos_token_id=None, pad_token_id=0)
            _sync(torch, dev)
            return r

        tj = np.asarray(ours())  # [b, new]
        tt = theirs()[:, prompt:].cpu().numpy()
        agree = _certify_decode(torch, dev, hf, ids, tj, tt, b)
        t_ours = common.median_time(ours, repeats)[0]
        t_hf = common.median_time(theirs, repeats)[0]
        out[f"b{b}"] = dict(agree, ours_s=t_ours, hf_s=t_hf, ours_tok_s=b * new / t_ours, hf_tok_s=b * new / t_hf,
                            speedup=t_hf / t_ours)
    return out


def _certify_decode(torch, dev, hf, ids, tj, tt, b: int) -> dict:
    """Agreement figures of ours (tj) vs HF (tt), both [b, new]; raises unless every split is a near-tie."""
    import numpy as np

    same = tj == tt
    first = np.where(same.all(1), tj.shape[1], np.argmin(same, axis=1))  # [b]: first differing step
    margins = []
    for row in np.nonzero(first < tj.shape[1])[0]:
        t = int(first[row])
        seq = np.concatenate([ids[row], tt[row, :t]])  # prompt + the shared prefix
        with torch.no_grad():
            lg = hf(input_ids=torch.from_numpy(seq[None]).long().to(dev)).logits[0, -1].float().cpu().numpy()
        rel = float(lg.max() - lg[tj[row, t]]) / max(float(np.abs(lg).max()), 1e-6)
        margins.append(rel)
        if rel > 2 * BF16_RTOL:
            raise Disagreement(
                f"decode (batch {b}), row {row}: tokens split at step {t} and HF's logit of our token "
                f"{int(tj[row, t])} is {rel:.3f} x max|logit| below its best (HF chose {int(tt[row, t])}); "
                f"a bf16 near-tie would be within {2 * BF16_RTOL:g}")
    head = min(DECODE_HEAD, tj.shape[1])
    return {"token_agreement": float(same.mean()), f"first{DECODE_HEAD}_agreement": float(same[:, :head].mean()),
            "mean_agreeing_prefix": float(first.mean()), "rows_split": len(margins),
            "max_split_margin_rel": max(margins, default=0.0)}


if __name__ == "__main__":
    sys.exit(main())
