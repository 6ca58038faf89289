"""The TPU compiler, on this CPU host, agrees with the sharding rules (needs libtpu: the `tpu` extra).

libtpu describes a v5e 2x2 slice (`jax.experimental.topologies`); the tiny model's train step
is compiled for it on a data=1, fsdp=2, tensor=2 mesh by `plan.plan_train_step`, exactly as
`launch/plan.py --topology` does. Checked from the compiled TPU HLO:
- every entry parameter has the per-device shard shape that sharding.LOGICAL_RULES gives
  (hand-computed for a few: embedding [V/tensor, D/fsdp], q kernel [L, D/fsdp, Q/tensor]);
- activations are split as model/decoder.py's logical constraints say: the residual stream
  [B/2, S, D], the MLP activations [B/2, S, F/2], q [B/2, S, H/2, Dh], and no full-size
  [B, S, D] or [B, S, F] buffer exists on any chip;
- a plan for TPU takes the TPU code path (no fused [x|u]@[W0;B] matmul) although this host's
  backend is the CPU: the configs are resolved for the mesh's platform before tracing;
- the decode plan (prefill + decode loop) compiles for the slice with the cache split as declared.
Model dims are pairwise distinct (B 8, S 16, D 48, F 80) so a shape names one activation.
Without libtpu the module is skipped with the install command as the reason.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from socialalign_jax.model import backend, decoder, pac_lora
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.pac_lora import LoraConfig
from socialalign_jax.model import axes as model_axes
from socialalign_jax.tools import plan as plan_lib
from socialalign_jax.parallel.mesh import make_mesh, platform_of
from socialalign_jax.train.step import LossConfig

pytestmark = pytest.mark.skipif(not plan_lib.libtpu_available(), reason=plan_lib.LIBTPU_HINT)

B, S, D, F, V, L, H, KV, DH = 8, 16, 48, 80, 256, 2, 4, 2, 8
CFG = ModelConfig("qwen2", V, D, F, L, H, KV, DH, tie_embeddings=False, dtype="bfloat16",
                  param_dtype="bfloat16", remat=True)
LC = LoraConfig(targets=("q", "down"))


@pytest.fixture(scope="module")
def mesh():
    devs = plan_lib.tpu_devices(plan_lib.tpu_slice("v5e-4"))
    assert len(devs) == 4 and devs[0].device_kind == "TPU v5 lite"
    return make_mesh(1, 2, 2, devices=devs)


@pytest.fixture(scope="module")
def plan(mesh):
    p = plan_lib.plan_train_step(CFG, LC, LossConfig(max_response_tokens=4), optax.adamw(1e-3), mesh,
                                 batch=B, seq=S)
    assert p.compiled, p.error
    return p


def _entry_shapes(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    head = hlo[hlo.index("entry_computation_layout={(") + len("entry_computation_layout={("):]
    head = head[:head.index(")->")]
    return [(dt, tuple(int(d) for d in dims.split(",") if d))
            for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", head)]


def test_fits_and_reports_the_chip(plan):
    assert plan.device_kind == "TPU v5 lite" and plan.hbm_bytes == 16 * 1024 ** 3
    assert plan.fits is True and 0 < plan.temp < plan.hbm_bytes
    assert "fits: peak" in plan.format() and "TPU v5 lite" in plan.format()


def test_parameters_have_the_rules_shard_shapes(plan, mesh):
    shapes = _entry_shapes(plan.executable.as_text())
    args = plan.lowered.args_info[0]  # (params, state, batch, rng) as the jit saw them
    leaves = jax.tree.leaves(args)
    assert len(shapes) == len(leaves)
    params = plan_lib.abstract_params(CFG)
    want = jax.tree.leaves(jax.tree.map(lambda x, s: s.shard_shape(x.shape), params,
                                        model_axes.shardings(params, mesh),
                                        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)),
                           is_leaf=lambda x: isinstance(x, tuple))
    got = [shape for _, shape in shapes[:len(want)]]
    assert got == want
    # By hand from the rules: embedding [V, D] -> [V/tensor, D/fsdp]; q [L, D, H*Dh] -> [L, D/fsdp, H*Dh/tensor];
    # down [L, F, D] -> [L, F/tensor, D/fsdp]; norms replicated.
    by_path = dict(zip([jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)], got))
    assert by_path["['embed']['embedding']"] == (V // 2, D // 2)
    assert by_path["['layers']['attn']['q']['kernel']"] == (L, D // 2, H * DH // 2)
    assert by_path["['layers']['mlp']['down']['kernel']"] == (L, F // 2, D // 2)
    assert by_path["['layers']['input_norm']['scale']"] == (L, D)
    # the batch: rows split over data x fsdp = 2
    assert (B // 2, S) in [shape for _, shape in shapes]


def test_activations_are_split_as_the_constraints_say(plan):
    hlo = plan.executable.as_text()
    for local in ([B // 2, S, D], [B // 2, S, F // 2], [B // 2, S, H // 2, DH], [B // 2, S, KV // 2, DH]):
        assert f"[{','.join(map(str, local))}]" in hlo, local
    for full in ([B, S, D], [B, S, F], [B, S, H, DH], [B // 2, S, F], [B, S, F // 2]):
        assert f"[{','.join(map(str, full))}]" not in hlo, full
    # the constraints themselves are in the lowered program (not only what propagation chose)
    text = plan.lowered.as_text()
    assert text.count("sharding_constraint") + text.count("@Sharding") >= 8


def test_tpu_target_takes_the_tpu_code_path(mesh):
    """fuse_base, attention and layer_loop 'auto' are resolved on the host for the mesh's devices
    (`backend.resolve_for_platform`), not for jax.default_backend(): TPU here on a CPU host."""
    assert jax.default_backend() == "cpu"
    lc = LoraConfig(targets=("q",))
    x = jnp.ones((2, 16, 8), jnp.float32)  # 32 rows: 'by_size' (the CPU's) fuses them (2 * 32 > 8 + 24)
    base = {"kernel": jnp.ones((8, 8), jnp.float32)}
    ad = decoder.init_adapters(jax.random.PRNGKey(0), CFG.replace(hidden_size=8, num_heads=1, num_kv_heads=1,
                                                                   head_dim=8, num_layers=1), lc)
    adapter = jax.tree.map(lambda a: a[0], ad["layers"]["attn"]["q"])
    route = {"seg": jnp.zeros((2, 16), jnp.int32), "valid": jnp.ones((2, 16), bool), "deterministic": True}

    def jaxpr_for(m):
        _, lcr = backend.resolve_for_platform(CFG, lc, platform_of(m))
        return str(jax.make_jaxpr(lambda x: pac_lora.adapted_linear(x, base, adapter, lcr, route)[0])(x))

    from socialalign_jax.model import sampling
    cpu_mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    assert platform_of(mesh) == "tpu" and platform_of(cpu_mesh) == "cpu"
    mc, lr = backend.resolve_for_platform(CFG, lc, platform_of(mesh))
    assert (mc.attention, lr.fuse_base) == ("einsum", "never")
    assert backend.resolve_sampling(sampling.SamplingConfig(), platform_of(mesh)).layer_loop == "scan"
    mc, lr = backend.resolve_for_platform(CFG, lc, platform_of(cpu_mesh))
    assert (mc.attention, lr.fuse_base) == ("einsum", "by_size")
    assert backend.resolve_sampling(sampling.SamplingConfig(), platform_of(cpu_mesh)).layer_loop == "unrolled"
    assert "custom_vjp" in jaxpr_for(cpu_mesh)  # the fused [x|u]@[W0;B] with its own backward
    assert "custom_vjp" not in jaxpr_for(mesh)
    np.testing.assert_equal(plan_lib.tpu_hbm_bytes("TPU v5 lite"), 16 * 1024 ** 3)


def test_decode_plan_compiles_for_tpu(mesh):
    """plan_decode: the cache's shardings from its declared axes, generate resolved for TPU and traced
    under the mesh's rules, compiled by the TPU compiler."""
    p = plan_lib.plan_decode(CFG, LC, mesh, batch=B, prompt_len=S, max_new_tokens=4)
    assert p.compiled, p.error
    assert p.kv_cache > 0 and p.fits is True
    # the prompts' k, v [L, B, Hkv, S, Dh] and the rows' own [L, B, Hkv, 4, Dh] (a branched cache,
    # decoder.branch_cache) split over rows (data x fsdp = 2) and kv heads (tensor = 2)
    text = p.executable.as_text()
    assert f"[{L},{B // 2},{KV // 2},{S},{DH}]" in text and f"[{L},{B // 2},{KV // 2},4,{DH}]" in text
