"""Benchmark 4: greedy decoding with the KV cache, ours vs Hugging Face generate.

Same base model and weights on both sides (no adapters: HF's generate with the original
PAC-LoRA would route decoded tokens differently, SPEC section 2), same prompts, greedy,
no repetition penalty, no stop token, the same number of new tokens; the token ids must
agree before anything is timed. Ours: `sampling.generate` (prefill + while_loop in one jit).
"""

from __future__ import annotations

import jax
import numpy as np

from benchmarks import common
from socialalign_jax.model import sampling


def run(quick: bool, repeats: int) -> dict:
    torch = common.setup_torch()
    layers_n, prompt, new = (1, 32, 16) if quick else (2, 128, 64)
    cfg = common.small_qwen2(layers_n)
    params = common.init_params(cfg)
    hf = common.hf_model_from(params, cfg)
    scfg = sampling.SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=new, stop_tokens=())
    out = {"shape": f"Qwen2.5-0.5B layers x {layers_n}, vocab {cfg.vocab_size}, prompt {prompt}, {new} new tokens"}
    for b in (1, 8):
        ids = np.random.default_rng(b).integers(0, 150000, (b, prompt)).astype(np.int32)
        mask = np.ones_like(ids)
        spans = (np.zeros((b,), np.int32), np.zeros((b,), np.int32))
        args = jax.device_put((params, None, ids, mask))

        def ours():
            return common.block(sampling.generate(*args, cfg, None, scfg, spans, jax.random.PRNGKey(0)).tokens)

        def theirs():
            with torch.no_grad():
                return hf.generate(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                                   do_sample=False, max_new_tokens=new, min_new_tokens=new, use_cache=True,
                                   eos_token_id=None, pad_token_id=0)
        tj = np.asarray(ours())
        tt = theirs()[:, prompt:].numpy()
        agree = float(np.mean(tj == tt))
        if agree < 0.95:  # float32 near-ties may flip a late token; most must match
            raise AssertionError(f"decode benchmark (batch {b}): only {agree:.0%} of greedy tokens agree with HF")
        t_ours = common.median_time(ours, repeats)[0]
        t_hf = common.median_time(theirs, repeats)[0]
        out[f"b{b}"] = {"token_agreement": agree, "ours_s": t_ours, "hf_s": t_hf,
                        "ours_tok_s": b * new / t_ours, "hf_tok_s": b * new / t_hf, "speedup": t_hf / t_ours}
    return out
