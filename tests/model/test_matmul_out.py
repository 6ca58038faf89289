"""ModelConfig.matmul_out: a bfloat16 model's linear maps ask their dots for float32 and round once.

Why it exists: XLA:CPU runs bf16 x bf16 -> f32 about twice as fast as float32 on a CPU with
AVX512-BF16, and bf16 x bf16 -> bf16 no faster than float32 (benchmarks/gemm_dtype.py), so 'auto'
is 'float32' for bfloat16 on CPUs. References here are independent of the code under test: numpy's float64
products of the same bf16 operands, rounded to bf16 by ml_dtypes; the float32 model; and the
compiled program's own dots (what XLA was asked for).
"""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from socialalign_jax.model import decoder, layers, pac_lora, sampling
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.pac_lora import LoraConfig

CFG = ModelConfig("llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, rope_theta=10000.0, qkv_bias=False)
BF16 = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")


def _bf16(rng, shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(ml_dtypes.bfloat16)


def _rounded_product(spec, a, b):
    """The exact product of two bf16 arrays (float64: bf16 x bf16 products and their sums of <= 200
    terms are exact to ~1e-13), rounded once to bf16."""
    return np.einsum(spec, np.asarray(a, np.float64), np.asarray(b, np.float64)).astype(ml_dtypes.bfloat16)


def _assert_rounded_once(got, want):
    """got equals the once-rounded exact product, but for values whose exact product lies within float32's
    accumulation error of a rounding boundary: there, one bf16 step (at most 1% of the elements here)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    step = 2.0 ** (np.floor(np.log2(np.abs(want) + 1e-30)) - 7)  # the bf16 spacing at each value
    assert np.all(np.abs(got - want) <= step), np.max(np.abs(got - want) / step)
    assert np.mean(got == want) >= 0.99


@pytest.mark.parametrize("rows", [1, 8, 80])
def test_linear_products_in_bfloat16_are_the_exact_product_rounded_once(rows):
    """base_matmul (the declared [d_in, d_out] kernel, and the decode form's [d_out, d_in], weight-major at
    1 and 8 rows, plain at 80) and base_plus_lora ([x|u] @ [W0; B]) with out32: bf16 results, each the
    exact product rounded once; the 1-row product is the decode step of a single prompt."""
    rng = np.random.default_rng(rows)
    x = _bf16(rng, (1, rows, 64))
    w = _bf16(rng, (64, 48), 0.2)
    u, b = _bf16(rng, (1, rows, 24)), _bf16(rng, (24, 48), 0.1)
    want = _rounded_product("bsd,de->bse", x, w)
    for base in ({"kernel": jnp.asarray(w)}, {"kernel_t": jnp.asarray(w.T)}):
        got = jax.jit(lambda x, base: pac_lora.base_matmul(x, base, out32=True))(jnp.asarray(x), base)
        assert got.dtype == jnp.bfloat16
        _assert_rounded_once(got, want)
    got = jax.jit(lambda *a: pac_lora.base_plus_lora(*a, True))(*map(jnp.asarray, (x, u, w, b)))
    assert got.dtype == jnp.bfloat16
    _assert_rounded_once(got, _rounded_product("bsk,ke->bse", np.concatenate([x, u], -1), np.concatenate([w, b], 0)))
    # float32 operands are untouched by out32 (the same program as without it)
    x32, w32 = np.asarray(x, np.float32), np.asarray(w, np.float32)
    np.testing.assert_array_equal(layers.matmul("bsd,de->bse", jnp.asarray(x32), jnp.asarray(w32), True),
                                  layers.matmul("bsd,de->bse", jnp.asarray(x32), jnp.asarray(w32), False))


# The einsums of a linear map's products (`pac_lora.adapted_linear`, `base_matmul`): x W0, [x | u] [W0; B],
# u B, x' [A | w1_a | w1_b], and the decode form's x W0 (weight-major or plain); not the gates' second
# layers or their statistics, which are float32.
LINEAR_SPECS = r"(bsd,de->bse|bsk,ke->bse|bsd,dk->bsk|ed,bsd->ebs|bsd,ed->bse)/"


def _linear_dot_types(hlo: str) -> set[tuple[str, str, str]]:
    """(lhs, rhs, result) element types of the compiled program's dots that come from the linear maps'
    products (instruction names are unique in an HLO module, so an operand's type is found by name)."""
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    found = set()
    for line in hlo.splitlines():
        m = re.search(r"= (\w+)\[[^\]]*\][^ ]* dot\(%([\w.\-]+), %([\w.\-]+)\)", line)
        if m and re.search(r'op_name="[^"]*\.lin/\w+/' + LINEAR_SPECS, line):
            found.add((types[m.group(2)], types[m.group(3)], m.group(1)))
    return found


def test_linear_maps_ask_for_float32_only_when_matmul_out_says_so():
    """The compiled prefill of a bf16 model (all seven maps adapted, fused and plain base products) and its
    decode-form step: with matmul_out='float32' ('auto' for bfloat16 on CPUs) every linear map's dot reads its bf16
    operands as they are and returns f32 (the form XLA:CPU gives its bf16 kernels); with 'dtype' none
    does (XLA:CPU computes such a bf16 dot in float32, converting its operands first); a float32 model's
    are float32 dots either way."""
    lc = LoraConfig(dropout=0.0)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 97, (2, 40)), jnp.int32)
    spans = (jnp.array([5, 6]), jnp.array([20, 22]))

    def types(cfg):
        params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, cfg.param_dtype),
                              jax.eval_shape(lambda: decoder.init_params(CFG, jax.random.PRNGKey(0))))
        ad = jax.eval_shape(lambda: decoder.init_adapters(jax.random.PRNGKey(1), cfg, lc))
        pre = jax.jit(lambda p, a, i: sampling.prefill(p, a, i, jnp.ones_like(i), cfg, lc, spans, 4).last_hidden)
        found = _linear_dot_types(pre.lower(params, ad, ids).compile().as_text())

        form = jax.eval_shape(lambda p, a: decoder.decode_form(p, a, lc)[:2], params, ad)
        cache = jax.eval_shape(lambda: decoder.init_cache(cfg, 2, 8, lc))
        step = jax.jit(lambda f, c, i: decoder.forward(f[0], i, cfg, adapters=f[1], lora_cfg=lc, cache=c).logits)
        return found, _linear_dot_types(step.lower(form, cache, ids[:, :1]).compile().as_text())

    mixed, f32 = ("bf16", "bf16", "f32"), ("f32", "f32", "f32")
    for cfg in (BF16.replace(matmul_out="float32"), BF16):  # 'auto' on the CPU
        assert types(cfg) == ({mixed}, {mixed}), cfg.matmul_out
    prefill, step = types(BF16.replace(matmul_out="dtype"))
    assert prefill and step and mixed not in prefill | step, (prefill, step)
    assert types(CFG.replace(matmul_out="dtype")) == types(CFG) == ({f32}, {f32})


@pytest.mark.parametrize("matmul_out", ["float32", "dtype"])
def test_bfloat16_prefill_and_decode_agree_with_float32(matmul_out):
    """Either setting computes the same model: a bf16 prefill and three decode steps (one row: the m = 1
    products; and two rows) stay within bf16 rounding of the float32 model's logits, and the two settings
    within that of each other."""
    lc = LoraConfig(dropout=0.0)
    params = decoder.init_params(CFG, jax.random.PRNGKey(0))
    ad = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.2 * jax.random.normal(jax.random.PRNGKey(7), x.shape) if str(p).endswith("'B']") else x,
        decoder.init_adapters(jax.random.PRNGKey(1), CFG, lc))
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 97, (2, 24)), jnp.int32)
    spans = (jnp.array([4, 5]), jnp.array([12, 14]))

    def run(cfg, p, rows):
        # As generation runs them: the prefill, then the decode form made once and decode steps over it
        # (`sampling.generate`; a step jitted together with the transposes that make its weights can
        # hand XLA:CPU a weight in a transposed layout, whose fallback dot refuses bf16 x bf16 -> f32).
        pre = jax.jit(lambda p, a: sampling.prefill(p, a, ids[:rows], jnp.ones_like(ids[:rows]), cfg, lc,
                                                    (spans[0][:rows], spans[1][:rows]), 4))(p, ad)
        form = jax.jit(lambda p, a: decoder.decode_form(p, a, lc)[:2])(p, ad)
        step = jax.jit(lambda f, c, t: decoder.forward(f[0], t, cfg, adapters=f[1], lora_cfg=lc, cache=c))
        cache, out = pre.cache, [pre.logits]
        for t in (3, 11, 29):
            nxt = step(form, cache, jnp.full((rows, 1), t))
            cache = nxt.cache
            out.append(nxt.logits[:, -1])
        return np.asarray(jnp.stack(out, 1).astype(jnp.float32))

    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    p32 = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), params)  # the same weights
    for rows in (1, 2):
        want = run(CFG, p32, rows)
        got = run(BF16.replace(matmul_out=matmul_out), p16, rows)
        other = run(BF16.replace(matmul_out={"float32": "dtype", "dtype": "float32"}[matmul_out]), p16, rows)
        scale = np.abs(want).max()
        assert 0 < np.abs(got - want).max() <= 3e-2 * scale, rows  # > 0: bf16 really ran
        assert np.abs(got - other).max() <= 3e-2 * scale, rows
