"""Backend-dependent code paths, each forced on the CPU, in float32 and bfloat16.

Four choices depend on where the program runs: attention (cuDNN's fused kernel or ours), what a
half-precision matmul's dot returns (matmul_out: float32 rounded after, or the compute dtype),
PAC-LoRA's fused base matmul ([x|u] @ [W0; B], fuse_base) and the decode layer loop (Python loop
over sliced weights vs lax.scan, layer_loop). 'auto' is resolved on the host, before tracing, for
the platform of the devices a step is built for (`model/backend.py`: the mesh's, else the
default devices), never `jax.default_backend()` inside a trace, so a TPU plan compiled on a CPU
host takes the TPU path (tests/parallel/test_tpu_compile.py checks that with libtpu).
Here every branch runs on the CPU against the other and against float32:
- float32: the branches agree to 1e-5 (same maths, different op order);
- bfloat16: each branch is within 2e-2 x max|float32 value| of the float32 result (8 significant
  bits; rounding in different places), for outputs and gradients.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from socialalign_jax.model import backend, sampling
from socialalign_jax.model import decoder, pac_lora
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.pac_lora import LoraConfig
from socialalign_jax.parallel.mesh import make_mesh, platform_of

F32_TOL = 1e-5
BF16_RTOL = 2e-2
CFG = ModelConfig("qwen2", vocab_size=101, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, rope_theta=10000.0)


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.abs(got - want).max() / np.abs(want).max()


def _adapters(lc):
    ad = decoder.init_adapters(jax.random.PRNGKey(1), CFG, lc)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 0.2 * jax.random.normal(jax.random.PRNGKey(len(str(p))), x.shape) if str(p).endswith("'B']") else x,
        ad)


def test_auto_resolves_on_the_host_for_a_platform():
    """resolve_for_platform / resolve_sampling: 'auto' -> a concrete choice per platform and dtype;
    an explicit setting is kept. A fake 'gpu' needs no GPU: nothing here runs on one."""
    lc = LoraConfig()
    bf16 = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
    assert platform_of(make_mesh(2, 2, 2)) == "cpu" == backend.default_platform()
    for platform, cfg, attention, fuse, loop, out in [
            ("cpu", bf16, "einsum", "by_size", "unrolled", "float32"),
            ("cpu", CFG, "einsum", "by_size", "unrolled", "dtype"),  # float32: the same program either way
            ("cpu", bf16.replace(dtype="float16"), "einsum", "by_size", "unrolled", "dtype"),  # no fast f16 kernel
            ("tpu", bf16, "einsum", "never", "scan", "dtype"),
            ("gpu", CFG, "einsum", "never", "scan", "dtype"),  # float32: not cuDNN's
            ("gpu", bf16, "cudnn", "never", "scan", "dtype"),
            ("gpu", bf16.replace(dtype="float16"), "cudnn", "never", "scan", "dtype"),
            ("gpu", bf16.replace(head_dim=12), "einsum", "never", "scan", "dtype"),
            ("gpu", bf16.replace(head_dim=256), "einsum", "never", "scan", "dtype")]:
        mc, lr = backend.resolve_for_platform(cfg, lc, platform)
        assert (mc.attention, mc.matmul_out, lr.fuse_base) == (attention, out, fuse), (platform, cfg)
        assert mc.replace(attention="auto", matmul_out="auto") == cfg and dataclasses.replace(lr, fuse_base="auto") == lc
        assert backend.resolve_sampling(sampling.SamplingConfig(), platform).layer_loop == loop
    # cuDNN refuses to differentiate masked attention over an odd length: a training step of one gets einsum
    assert backend.resolve_for_platform(bf16, lc, "gpu", train_seq_len=63)[0].attention == "einsum"
    assert backend.resolve_for_platform(bf16, lc, "gpu", train_seq_len=64)[0].attention == "cudnn"
    # explicit settings are kept on every platform; no adapters: lora_cfg stays None
    for platform in backend.PLATFORMS:
        mc, lr = backend.resolve_for_platform(CFG.replace(attention="xla", matmul_out="dtype"),
                                              dataclasses.replace(lc, fuse_base="never"), platform)
        assert (mc.attention, mc.matmul_out, lr.fuse_base) == ("xla", "dtype", "never")
        assert backend.resolve_for_platform(CFG, None, platform)[1] is None
        assert backend.resolve_sampling(sampling.SamplingConfig(layer_loop="scan"), platform).layer_loop == "scan"
    # unresolved, traced code takes the default devices' choice (the CPU here)
    assert backend.resolve_for_platform(CFG, lc) == backend.resolve_for_platform(CFG, lc, "cpu")
    # 'by_size' (the CPU's): fused for a prefill's 64 rows of a 64-wide map with k = 24, not for a decode step's 8
    assert pac_lora._fuse_base(lc, 64, 64, 24) and not pac_lora._fuse_base(lc, 8, 64, 24)
    assert sampling.use_layer_loop(sampling.SamplingConfig())
    assert pac_lora._fuse_base(dataclasses.replace(lc, fuse_base="always"), 1, 64, 24)
    assert not pac_lora._fuse_base(dataclasses.replace(lc, fuse_base="never"), 10**6, 64, 24)
    assert not sampling.use_layer_loop(sampling.SamplingConfig(layer_loop="scan"))
    with pytest.raises(ValueError, match="unknown platform"):
        backend.resolve_for_platform(CFG, lc, "METAL")
    with pytest.raises(ValueError, match="unknown matmul_out"):
        CFG.replace(matmul_out="bfloat16")


def test_resolved_configs_are_traced_without_asking_the_platform(monkeypatch):
    """With resolved configs the trace makes no backend decision: `default_platform` is not called
    while the forward, a gradient or generation is traced. Unresolved, it is (and only then)."""
    lc = LoraConfig(dropout=0.0, targets=("q", "down"))
    params = jax.eval_shape(lambda: decoder.init_params(CFG, jax.random.PRNGKey(0)))
    ad = jax.eval_shape(lambda: decoder.init_adapters(jax.random.PRNGKey(1), CFG, lc))
    ids = jnp.zeros((2, 8), jnp.int32)
    mc, lr = backend.resolve_for_platform(CFG, lc, "cpu")
    scfg = backend.resolve_sampling(sampling.SamplingConfig(greedy=True, max_new_tokens=2, stop_tokens=()), "cpu")
    calls = []
    monkeypatch.setattr(backend, "default_platform", lambda: calls.append(1) or "cpu")

    def loss(a, p, cfg, lcf):
        return jnp.sum(decoder.forward(p, ids, cfg, adapters=a, lora_cfg=lcf).logits)

    jax.make_jaxpr(jax.grad(loss), static_argnums=(2, 3))(ad, params, mc, lr)
    spans = (jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32))
    gen = functools.partial(sampling.generate.__wrapped__, cfg=mc, lora_cfg=lr, scfg=scfg)  # a fresh trace
    jax.eval_shape(gen, params, ad, ids, jnp.ones_like(ids), spans=spans, rng=jax.random.PRNGKey(0))
    assert calls == []
    jax.make_jaxpr(jax.grad(loss), static_argnums=(2, 3))(ad, params, CFG, lc)
    assert calls


@pytest.mark.parametrize("routing", ["token", "pooled"])
def test_fuse_base_branches_in_float32_and_bfloat16(routing):
    lc = LoraConfig(routing=routing, dropout=0.0, targets=("q", "down"))
    params = decoder.init_params(CFG, jax.random.PRNGKey(0))
    ad = _adapters(lc)
    ids = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, CFG.vocab_size)
    spans = (jnp.array([3, 4]), jnp.array([7, 9]))

    def loss_and_grad(cfg, p, fuse):
        lcf = dataclasses.replace(lc, fuse_base=fuse)

        def f(a):
            out = decoder.forward(p, ids, cfg, adapters=a, lora_cfg=lcf, spans=spans)
            return jnp.sum(out.logits ** 2) / out.logits.size, out.logits
        (loss, logits), g = jax.jit(jax.value_and_grad(f, has_aux=True))(ad)
        return logits, g

    ref_logits, ref_g = loss_and_grad(CFG, params, "never")
    logits, g = loss_and_grad(CFG, params, "always")
    np.testing.assert_allclose(logits, ref_logits, atol=F32_TOL * np.abs(ref_logits).max(), rtol=0)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(a, b, atol=F32_TOL * max(np.abs(b).max(), 1e-12), rtol=0)

    cfg16 = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    flat = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])  # noqa: E731
    for fuse in ("always", "never"):
        lg16, g16 = loss_and_grad(cfg16, p16, fuse)
        assert 0 < _rel(lg16, ref_logits) <= BF16_RTOL, fuse  # > 0: bf16 really ran
        assert _rel(flat(g16), flat(ref_g)) <= BF16_RTOL * 3, fuse  # back through both layers in bf16


@pytest.mark.parametrize("dtype,tol", [("float32", F32_TOL), ("bfloat16", BF16_RTOL)])
def test_layer_loop_branches_prefill_and_decode(dtype, tol):
    """The decode step through the stacked scan (cache in the carry) and the unrolled loop, over sliced
    weights and over `decoder.decode_form`'s (kernels transposed; pooled routing keeps its adapters)."""
    lc = LoraConfig(routing="pooled", dropout=0.0, targets=("q", "v", "up"))
    cfg = CFG.replace(dtype=dtype, param_dtype=dtype)
    params = decoder.init_params(CFG, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    ad = _adapters(lc)
    ids = jax.random.randint(jax.random.PRNGKey(3), (2, 10), 0, CFG.vocab_size)
    mask = jnp.ones((2, 10), jnp.int32).at[1, :2].set(0)  # left padding
    spans = (jnp.array([2, 3]), jnp.array([5, 6]))
    nxt = jnp.array([[5], [7]])

    @jax.jit
    def run(p):
        cache = decoder.init_cache(cfg, 2, 16, lc)
        out = decoder.forward(p, ids, cfg, attention_mask=mask, adapters=ad, lora_cfg=lc, spans=spans, cache=cache)
        out2 = decoder.forward(p, nxt, cfg, adapters=ad, lora_cfg=lc, cache=out.cache)
        return out.logits, out2.logits, out2.cache["k"]

    @jax.jit
    def run_decode_form(p, form):  # prefill stacked, then a step over `decoder.decode_form`'s weights
        cache = decoder.init_cache(cfg, 2, 16, lc)
        out = decoder.forward(p, ids, cfg, attention_mask=mask, adapters=ad, lora_cfg=lc, spans=spans, cache=cache)
        out2 = decoder.forward(form[0], nxt, cfg, adapters=form[1], lora_cfg=lc, cache=out.cache)
        return out.logits, out2.logits, out2.cache["k"]

    form = decoder.decode_form(params, ad, lc)  # pooled: adapters kept (per layer), kernels transposed
    assert form[2] == lc and "kernel_t" in form[0]["layers"][0]["attn"]["q"]
    assert form[0]["layers"][0]["attn"]["q"]["kernel_t"].dtype == jnp.dtype(dtype)
    scan = run(params)
    others = (run(decoder.unstack_layers(params)), run_decode_form(params, form[:2]))
    for other in others:
        for a, b in zip(scan, other):  # prefill logits, decode logits, the written cache
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       atol=tol * float(np.abs(np.asarray(b, np.float32)).max()), rtol=0)
    # and against a cache-free full forward over prompt + token in float32
    full = jnp.concatenate([ids, nxt], axis=1)
    fmask = jnp.concatenate([mask, jnp.ones((2, 1), jnp.int32)], axis=1)
    params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    want = decoder.forward(params32, full, CFG, attention_mask=fmask, adapters=ad, lora_cfg=lc,
                           spans=spans).logits[:, -1]
    for got in (scan[1], *(o[1] for o in others)):
        assert _rel(got[:, 0], want) <= tol


def test_generate_layer_loops_emit_the_same_tokens():
    """The scan decodes with the adapters as they are, the CPU loop with them merged into the kernels
    (`decoder.decode_form`): the same greedy tokens, also where a given span reaches past the prompt
    (row 1's news ends at 12 of 8 tokens: `sampling.prefill` clips it, so no generated token is news)."""
    lc = LoraConfig(dropout=0.0, targets=("q", "o", "down"))
    params = decoder.init_params(CFG, jax.random.PRNGKey(0))
    ad = _adapters(lc)
    ids = np.asarray(jax.random.randint(jax.random.PRNGKey(4), (2, 8), 1, CFG.vocab_size), np.int32)
    mask = np.ones_like(ids)
    mask[0, :2] = 0  # row 0: 6 real tokens, left-padded
    spans = (np.array([2, 3], np.int32), np.array([5, 12], np.int32))
    pre = sampling.prefill(params, ad, jnp.asarray(ids), jnp.asarray(mask), CFG, lc, spans, 4)
    np.testing.assert_array_equal(np.asarray(pre.cache["news_end"]), [5, 8])
    np.testing.assert_array_equal(np.asarray(pre.cache["user_end"]), [2, 3])
    clipped = sampling.prefill(params, ad, jnp.asarray(ids), jnp.asarray(mask), CFG, lc, (spans[0], np.array([5, 8])), 4)
    np.testing.assert_array_equal(np.asarray(pre.logits), np.asarray(clipped.logits))  # the prompt's routing is kept
    toks = {}
    for loop in ("scan", "unrolled"):
        scfg = sampling.SamplingConfig(greedy=True, max_new_tokens=6, stop_tokens=(), layer_loop=loop)
        toks[loop] = np.asarray(sampling.generate(params, ad, ids, mask, CFG, lc, scfg, spans,
                                                  jax.random.PRNGKey(0)).tokens)
    np.testing.assert_array_equal(toks["scan"], toks["unrolled"])


@pytest.mark.parametrize("dtype,tol", [("float32", F32_TOL), ("bfloat16", BF16_RTOL)])
def test_attention_impls_agree_with_left_padding_and_a_cache(dtype, tol):
    """cfg.attention='xla' (jax.nn.dot_product_attention) against our 'einsum' path: logits and
    adapter gradients of a left-padded forward, and a cached decode step (mask from positions).
    'cudnn' needs a GPU: benchmarks/device_check.py checks it there against the same path."""
    lc = LoraConfig(dropout=0.0, targets=("q", "v"))
    params = jax.tree.map(lambda a: a.astype(dtype), decoder.init_params(CFG, jax.random.PRNGKey(0)))
    ad = _adapters(lc)
    ids = jax.random.randint(jax.random.PRNGKey(5), (2, 10), 0, CFG.vocab_size)
    mask = jnp.ones((2, 10), jnp.int32).at[0, :3].set(0)
    spans = (jnp.array([4, 3]), jnp.array([7, 6]))

    def run(impl):
        cfg = CFG.replace(dtype=dtype, param_dtype=dtype, attention=impl)

        def loss(a):
            out = decoder.forward(params, ids, cfg, attention_mask=mask, adapters=a, lora_cfg=lc, spans=spans)
            return jnp.sum((out.logits * mask[..., None]) ** 2) / out.logits.size, out.logits

        (_, logits), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(ad)
        cache = decoder.init_cache(cfg, 2, 12, lc)
        out = decoder.forward(params, ids, cfg, attention_mask=mask, adapters=ad, lora_cfg=lc, spans=spans,
                              cache=cache)
        step = decoder.forward(params, jnp.array([[3], [9]]), cfg, adapters=ad, lora_cfg=lc, cache=out.cache)
        return np.asarray(logits, np.float32)[mask > 0], g, np.asarray(step.logits, np.float32)

    ref, ref_g, ref_step = run("einsum")
    got, g, step = run("xla")
    assert _rel(got, ref) <= tol and _rel(step, ref_step) <= tol
    flat = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])  # noqa: E731
    assert 0 < np.abs(flat(ref_g)).max() and _rel(flat(g), flat(ref_g)) <= tol * 3
    # 'auto' on CPUs is the einsum path itself.
    auto, _, _ = run("auto")
    np.testing.assert_array_equal(auto, ref)


def test_attend_runs_the_named_implementation_and_catches_nothing(monkeypatch):
    """attend() passes cfg.attention through (resolved on the host); a cuDNN refusal is not caught."""
    from socialalign_jax.model import layers, modules

    calls = []

    def fake(q, k, v, q_pos, k_pos, impl="einsum"):
        calls.append(impl)
        if impl == "cudnn":
            raise NotImplementedError("cuDNN: unsupported head size")
        return q

    monkeypatch.setattr(layers, "attention", fake)
    q = jnp.zeros((1, 2, 4, 8), jnp.bfloat16)
    pos = jnp.zeros((1, 2), jnp.int32)
    bf16 = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
    for platform, want in [("cpu", "einsum"), ("tpu", "einsum"), ("gpu", "cudnn")]:
        calls.clear()
        cfg, _ = backend.resolve_for_platform(bf16, None, platform)
        if want == "cudnn":
            with pytest.raises(NotImplementedError, match="cuDNN"):  # an explicit or resolved 'cudnn' fails loudly
                modules.attend(cfg, q, q, q, pos, pos)
        else:
            modules.attend(cfg, q, q, q, pos, pos)
        assert calls == [want], platform
    calls.clear()
    modules.attend(bf16, q, q, q, pos, pos)  # unresolved 'auto': the default devices (CPU)
    assert calls == ["einsum"]
    with pytest.raises(ValueError, match="unknown attention"):
        CFG.replace(attention="flash")
