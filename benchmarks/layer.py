"""Benchmark 1: one PAC-LoRA linear map, forward + backward, ours vs the original-style PyTorch.

Both compute y = x W0 + b + delta(x) on the same weights with gates on masked inputs (token
routing), then the gradients w.r.t. every adapter weight and x for a fixed cotangent.
Memory: ours = the compiled fwd+bwd's temp bytes (XLA buffer assignment); PyTorch = bytes of
the tensors autograd saves for backward (saved_tensors_hooks, unique storages), a LOWER bound
of its peak (it omits the gradients and op workspaces), so the ratio is conservative for us.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from socialalign_jax.model import modules, pac_lora


def run(quick: bool, repeats: int) -> dict:
    torch = common.setup_torch()
    from benchmarks.torch_ref.pac_lora import PacLoraLinear, Routing

    b, s, d_in, d_out = (2, 128, 896, 4864) if quick else (4, 512, 896, 4864)
    lc = pac_lora.LoraConfig(dropout=0.0)  # dropout masks differ across frameworks: off for both
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, s, d_in)).astype(np.float32)
    ct = rng.standard_normal((b, s, d_out)).astype(np.float32)
    w0 = (0.02 * rng.standard_normal((d_in, d_out))).astype(np.float32)
    bias = (0.02 * rng.standard_normal((d_out,))).astype(np.float32)
    ad = jax.tree.map(np.asarray, modules.init_linear_adapter(jax.random.PRNGKey(0), 1, d_in, d_out, lc))
    ad = jax.tree.map(lambda a: a[0], ad)
    ad["B"] = rng.uniform(-0.05, 0.05, ad["B"].shape).astype(np.float32)
    user_end = np.full((b,), s // 2, np.int32)
    news_end = np.full((b,), 3 * s // 4, np.int32)
    pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    seg = np.where(pos < user_end[:, None], 0, np.where(pos < news_end[:, None], 1, 2)).astype(np.int32)

    def fwd_bwd(adapter, x, base, seg, ct):
        route = {"seg": seg, "valid": jnp.ones(seg.shape, bool), "deterministic": True}
        f = lambda a, xx: pac_lora.adapted_linear(xx, base, a, lc, route)[0]  # noqa: E731
        y, vjp = jax.vjp(f, adapter, x)
        return y, vjp(ct)

    ours = jax.jit(fwd_bwd)
    base = {"kernel": w0, "bias": bias}
    args = [jax.device_put(t) for t in (ad, x, base, seg, ct)]
    compiled = ours.lower(*args).compile()
    mem_ours = int(compiled.memory_analysis().temp_size_in_bytes)
    y_j, (g_ad, g_x) = common.block(compiled(*args))

    routing = Routing()
    lin = torch.nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w0.T.copy()))
        lin.bias.copy_(torch.from_numpy(bias))
    mod = PacLoraLinear(lin, routing, dropout=0.0)
    mod.load_from_jax(ad)
    routing.seg = torch.from_numpy(seg).long()
    xt = torch.from_numpy(x).requires_grad_(True)
    ctt = torch.from_numpy(ct)

    def torch_step():
        mod.zero_grad(set_to_none=True)
        xt.grad = None
        y = mod(xt)
        y.backward(ctt)
        return y

    y_t = torch_step()
    ok = {
        "y": float(np.max(np.abs(np.asarray(y_j) - y_t.detach().numpy()))),
        "dA": float(np.max(np.abs(np.asarray(g_ad["A"]).transpose(0, 2, 1) - mod.A.grad.numpy()))),
        "dB": float(np.max(np.abs(np.asarray(g_ad["B"]).transpose(0, 2, 1) - mod.B.grad.numpy()))),
        "dx": float(np.max(np.abs(np.asarray(g_x) - xt.grad.numpy()))),
    }
    scale = {"y": np.abs(np.asarray(y_j)).max(), "dA": np.abs(mod.A.grad.numpy()).max(),
             "dB": np.abs(mod.B.grad.numpy()).max(), "dx": np.abs(xt.grad.numpy()).max()}
    for k, v in ok.items():
        if v > 1e-3 * max(1.0, float(scale[k])):
            raise AssertionError(f"layer benchmark: ours and PyTorch disagree on {k}: max |diff| {v}")

    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mod(xt)
    del y
    mem_torch = sum(saved.values())

    t_ours, _ = common.median_time(lambda: common.block(compiled(*args)), repeats)
    t_torch, _ = common.median_time(torch_step, repeats)
    return {
        "shape": f"x [{b}, {s}, {d_in}] -> {d_out}, r {lc.rank}, {lc.num_analyze}x{lc.num_compose} experts",
        "max_abs_diff": ok, "ours_s": t_ours, "torch_s": t_torch, "speedup": t_torch / t_ours,
        "ours_temp_bytes": mem_ours, "torch_saved_bytes": mem_torch, "peak_memory_ratio": mem_ours / mem_torch,
        "bte_tensor_bytes": b * s * lc.num_compose * d_out * 4,
    }
