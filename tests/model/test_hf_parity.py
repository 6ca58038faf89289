"""Our decoder on an imported checkpoint gives Hugging Face transformers' logits.

The reference is transformers' own Qwen2ForCausalLM / LlamaForCausalLM in PyTorch float32 on
the same right-padded batch and attention mask; only real (non-pad) positions are compared,
since what a model emits at padding is unspecified.
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from socialalign_jax.model.decoder import forward
from socialalign_jax.weights.hf import load_hf_checkpoint

torch = pytest.importorskip("torch", reason="torch (CPU) is needed for the HF transformers reference")
pytest.importorskip("transformers")
from tests.helpers_hf import make_hf_model, save_hf_model  # noqa: E402

F32_TOL = 1e-4
# bf16 params and compute vs a float32 reference on the same bf16-rounded weights: bf16 keeps
# 8 mantissa bits (relative rounding 2^-9 per op), so logits of size ~2 drift by ~1e-2 after
# 2 layers (measured: max 0.019, mean 0.0037). Bounds leave 4x headroom; docs/checkpoints.md.
BF16_MAX_ABS = 0.08
BF16_MEAN_ABS = 0.015


@functools.partial(jax.jit, static_argnames="cfg")
def _logits(params, ids, mask, cfg):
    return forward(params, ids, cfg, attention_mask=mask).logits


def _batch(vocab, seed=0):
    """[3, 12] ids with right padding (lengths 12, 7, 3); pad id 0 deliberately a real token id."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(3, 12)).astype(np.int32)
    mask = (np.arange(12)[None] < np.array([12, 7, 3])[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, 0), mask


def _hf_logits(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    return out.logits.float().numpy()


CASES = [
    # family, vocab, tied, max_shard_size
    ("qwen2", 512, False, "40KB"),
    ("qwen2", 1000, True, None),
    ("llama", 1000, False, "60KB"),
    ("llama", 512, True, None),
]


@pytest.mark.parametrize("family,vocab,tied,shard", CASES, ids=[f"{c[0]}-v{c[1]}-{'tied' if c[2] else 'untied'}"
                                                                 for c in CASES])
def test_float32_logits_match_hf(tmp_path, family, vocab, tied, shard):
    model = make_hf_model(family, seed=vocab + tied, vocab=vocab, tied=tied)
    save_hf_model(model, tmp_path, max_shard_size=shard)
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    cfg, params = load_hf_checkpoint(tmp_path)
    assert cfg.tie_embeddings == tied and cfg.qkv_bias == (family == "qwen2")
    ids, mask = _batch(vocab)
    ours = np.asarray(_logits(params, jnp.asarray(ids), jnp.asarray(mask), cfg))
    ref = _hf_logits(model, ids, mask)
    real = mask == 1
    assert ours.shape == ref.shape == (3, 12, vocab)
    assert np.abs(ref[real]).max() > 0.5  # the comparison is not between two near-zero tensors
    np.testing.assert_allclose(ours[real], ref[real], rtol=0, atol=F32_TOL)


def test_padding_does_not_change_real_positions(tmp_path):
    """Right padding is invisible to real tokens: same logits as each sequence alone (HF-free check)."""
    model = make_hf_model("qwen2", seed=5)
    save_hf_model(model, tmp_path)
    cfg, params = load_hf_checkpoint(tmp_path)
    ids, mask = _batch(512, seed=1)
    batched = np.asarray(_logits(params, jnp.asarray(ids), jnp.asarray(mask), cfg))
    n = int(mask[1].sum())
    alone = np.asarray(_logits(params, jnp.asarray(ids[1:2, :n]), jnp.ones((1, n), jnp.int32), cfg))
    np.testing.assert_allclose(batched[1, :n], alone[0], rtol=0, atol=F32_TOL)


def test_bf16_logits_close_to_hf_float32(tmp_path):
    model = make_hf_model("qwen2", seed=7, vocab=512)
    # reference: the same bf16-rounded weights, computed in float32 by transformers. (Round the
    # parameters only: Module.to(bfloat16) would also round the RoPE inv_freq buffer.)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    save_hf_model(copy.deepcopy(model), tmp_path, dtype=torch.bfloat16)  # as released Qwen2.5 weights
    cfg, params = load_hf_checkpoint(tmp_path)
    assert cfg.param_dtype == cfg.dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    ids, mask = _batch(512, seed=2)
    ours = np.asarray(_logits(params, jnp.asarray(ids), jnp.asarray(mask), cfg))
    assert ours.dtype == np.float32
    ref = _hf_logits(model, ids, mask)
    real = mask == 1
    err = np.abs(ours[real] - ref[real])
    print(f"bf16 vs float32 reference: max abs {err.max():.4f}, mean abs {err.mean():.5f}, "
          f"max |logit| {np.abs(ref[real]).max():.2f}")
    assert err.max() <= BF16_MAX_ABS and err.mean() <= BF16_MEAN_ABS, (err.max(), err.mean())
    # and the float32 path on the very same file is exact again
    cfg32, params32 = load_hf_checkpoint(tmp_path, dtype="float32")
    ours32 = np.asarray(_logits(params32, jnp.asarray(ids), jnp.asarray(mask), cfg32))
    np.testing.assert_allclose(ours32[real], ref[real], rtol=0, atol=F32_TOL)
