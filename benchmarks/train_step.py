"""Benchmarks 2 and 3: the training step, ours vs PyTorch, and the cost of PAC-LoRA.

Same model (Qwen2.5-0.5B layer shapes, fewer layers, the real 151,936 vocabulary, tied
embeddings), same weights, same batch, same objective: LM cross-entropy on the response
tokens only (logits gathered at those positions on both sides), the sentiment head's CE at
the last prompt token, and the macro JSD term (mean estimator). PyTorch: HF
Qwen2ForCausalLM with the original-style PAC-LoRA injected into the seven projections and
torch.optim.AdamW on the adapters and head only. Ours: `train.step.make_train_step`, jitted
with the state donated. Dropout 0.1 on both sides while timing; the agreement check runs
both deterministically.
"""

from __future__ import annotations

import jax
import numpy as np
import optax

from benchmarks import common
from socialalign_jax.model import pac_lora
from socialalign_jax.train import flops, step as step_lib


def make_batch(b: int, s: int, resp: int, k: int = 3, seed: int = 0, vocab: int = 150000) -> dict:
    rng = np.random.default_rng(seed)
    prompt_len = s - resp
    loss_mask = np.zeros((b, s), np.int32)
    loss_mask[:, prompt_len:] = 1
    td = rng.dirichlet(np.ones(k), size=b // 2).astype(np.float32)
    return {
        "input_ids": rng.integers(0, vocab, (b, s)).astype(np.int32),
        "attention_mask": np.ones((b, s), np.int32), "loss_mask": loss_mask,
        "user_end": np.full((b,), prompt_len // 3, np.int32), "news_end": np.full((b,), 2 * prompt_len // 3, np.int32),
        "prompt_len": np.full((b,), prompt_len, np.int32), "label": (np.arange(b) % k).astype(np.int32),
        "event_id": (np.arange(b) // 2).astype(np.int32), "example_mask": np.ones((b,), np.float32),
        "target_dist": np.repeat(td, 2, axis=0),
    }


def torch_loss(torch, hf, head, batch, routing, seg_fn):
    """The same objective as step.compute_loss, written directly in PyTorch (numpy batch, host tensors)."""
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    return torch_objective(torch, hf, head, t, int(batch["prompt_len"][0]), routing, seg_fn)


def torch_objective(torch, hf, head, t, p: int, routing, seg_fn):
    """LM CE on the response tokens, sentiment CE at the last prompt token, macro JSD between each
    event's mean prediction and its target. t: make_batch's arrays as tensors on any device;
    p: the prompt length, common to all rows."""
    ids = t["input_ids"].long()  # [b, s]
    b, s = ids.shape
    pos = torch.arange(s, device=ids.device)[None].expand(b, s)
    routing.seg = seg_fn(pos, t["user_end"], t["news_end"])
    hidden = hf.model(input_ids=ids).last_hidden_state  # [b, s, d] after the final norm
    logits = hf.lm_head(hidden[:, p - 1:s - 1]).float()  # predicts tokens p .. s-1
    lm = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, p:].reshape(-1))
    sl = head(hidden[:, p - 1].float()).float()  # [b, K]
    sent = torch.nn.functional.cross_entropy(sl, t["label"].long())
    probs = torch.softmax(sl, -1)
    ev = t["event_id"].long()
    # The event mean for every row at once: same[i, j] = rows i and j share an event [b, b]. No
    # torch.unique / per-event loop, so a CUDA step never waits on the host. Each event's JSD
    # weighted by its row count over all rows == the mean over rows of their event's JSD.
    same = (ev[:, None] == ev[None, :]).float()
    P = (same @ probs) / same.sum(1, keepdim=True)  # [b, K]: row i's event mean prediction
    Q = t["target_dist"].float()  # [b, K]: every row of an event carries the event's target
    M = (P + Q) / 2
    kl = lambda a, c: torch.sum(torch.where(a > 0, a * (torch.log(a.clamp_min(1e-30)) - torch.log(c)), 0.0), -1)  # noqa: E731
    macro = torch.mean(0.5 * kl(P, M) + 0.5 * kl(Q, M))
    return lm + sent + macro, (lm, sent, macro)


def _ours(cfg, lc, loss_cfg, params, adapters, batch, repeats, diff_norms=False):
    """Median step time of our jitted train step (state donated)."""
    opt = optax.adamw(1e-4, weight_decay=0.01)
    state = step_lib.init_train_state(adapters, opt)
    if diff_norms:  # frozen base fwd+bwd: gradients reach only the RMSNorm scales, through every layer
        def loss(scales, params, batch, rng):
            p = dict(params, layers=dict(params["layers"], input_norm={"scale": scales[0]},
                                         post_attn_norm={"scale": scales[1]}))
            return step_lib.compute_loss({"head": adapters["head"]}, p, batch, rng, model_cfg=cfg,
                                         lora_cfg=lc, loss_cfg=loss_cfg, deterministic=True)[0]
        g = jax.jit(jax.value_and_grad(loss))
        scales = (params["layers"]["input_norm"]["scale"], params["layers"]["post_attn_norm"]["scale"])
        fn = lambda: common.block(g(scales, params, batch, jax.random.PRNGKey(0)))  # noqa: E731
        return common.median_time(fn, repeats)[0]
    step = jax.jit(step_lib.make_train_step(cfg, lc, loss_cfg, opt), donate_argnums=(1,))
    box = {"state": state}

    def fn():
        box["state"], m = step(params, box["state"], batch, jax.random.PRNGKey(0))
        common.block(m)
    return common.median_time(fn, repeats)[0]


def run(quick: bool, repeats: int) -> dict:
    torch = common.setup_torch()
    from benchmarks.torch_ref import pac_lora as tref

    layers_n, b, s, resp = (1, 2, 128, 32) if quick else (2, 4, 512, 64)
    cfg = common.small_qwen2(layers_n)
    lc = pac_lora.LoraConfig()
    loss_cfg = step_lib.LossConfig(max_response_tokens=resp)
    params = common.init_params(cfg)
    adapters = common.random_adapters(cfg, lc)
    batch = make_batch(b, s, resp)
    jbatch = jax.device_put(batch)

    # ---- PyTorch side, same weights
    hf = common.hf_model_from(params, cfg)
    routing = tref.Routing()
    mods = tref.inject(hf, routing, dropout=lc.dropout)
    tref.load_adapters(hf, adapters)
    head = torch.nn.Linear(cfg.hidden_size, lc.num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(np.asarray(adapters["head"]["kernel"]).T.copy()))
        head.bias.copy_(torch.from_numpy(np.asarray(adapters["head"]["bias"])))
    trainable = [p for m in mods for p in m.parameters() if p.requires_grad] + list(head.parameters())
    opt_t = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)

    # ---- agreement check (deterministic): loss terms and one adapter gradient
    hf.eval()
    lt, (lm_t, sent_t, macro_t) = torch_loss(torch, hf, head, batch, routing, tref.segment_ids)
    lt.backward()
    (lj, (terms, _)), gj = jax.value_and_grad(step_lib.compute_loss, has_aux=True)(
        adapters, params, jbatch, jax.random.PRNGKey(0), model_cfg=cfg, lora_cfg=lc, loss_cfg=loss_cfg,
        deterministic=True)
    g_b_t = mods[0].B.grad.numpy()  # layer 0, q: [E, d_out, r]
    g_b_j = np.asarray(gj["layers"]["attn"]["q"]["B"][0]).transpose(0, 2, 1)
    check = {"loss_ours": float(lj), "loss_torch": float(lt), "lm": [float(terms["lm"]), float(lm_t)],
             "sent": [float(terms["sent"]), float(sent_t)], "macro": [float(terms["macro"]), float(macro_t)],
             "dB_q0_max_abs_diff": float(np.abs(g_b_t - g_b_j).max()), "dB_q0_max_abs": float(np.abs(g_b_t).max())}
    if abs(check["loss_ours"] - check["loss_torch"]) > 1e-3 * abs(check["loss_torch"]) or \
            check["dB_q0_max_abs_diff"] > 1e-2 * check["dB_q0_max_abs"]:
        raise AssertionError(f"train-step benchmark: ours and PyTorch disagree: {check}")
    opt_t.zero_grad(set_to_none=True)

    hf.train()

    def torch_step():
        opt_t.zero_grad(set_to_none=True)
        loss, _ = torch_loss(torch, hf, head, batch, routing, tref.segment_ids)
        loss.backward()
        opt_t.step()

    t_torch = common.median_time(torch_step, repeats)[0]
    t_ours = _ours(cfg, lc, loss_cfg, params, adapters, jbatch, repeats)
    # The same step with the layers as a Python loop (--config.model.scan_layers=false).
    t_unrolled = _ours(cfg.replace(scan_layers=False), lc, loss_cfg, params, adapters, jbatch, repeats)
    lc_lora = pac_lora.LoraConfig(num_analyze=1, num_compose=1)
    t_lora = _ours(cfg, lc_lora, loss_cfg, params, common.random_adapters(cfg, lc_lora), jbatch, repeats)
    t_base = _ours(cfg, lc, loss_cfg, params, adapters, jbatch, repeats, diff_norms=True)
    tokens = b * s
    step_flops = flops.train_step_flops(cfg, lc, b, s, resp, lc.num_classes)
    return {
        "shape": f"Qwen2.5-0.5B layers x {layers_n}, vocab {cfg.vocab_size}, batch {b} x {s}, {resp} response tokens/row",
        "check": check, "ours_s": t_ours, "torch_s": t_torch,
        "ours_tok_s": tokens / t_ours, "torch_tok_s": tokens / t_torch, "speedup": t_torch / t_ours,
        "unrolled_s": t_unrolled, "unrolled_tok_s": tokens / t_unrolled, "speedup_unrolled": t_torch / t_unrolled,
        "lora_s": t_lora, "base_fwd_bwd_s": t_base, "pac_over_lora": t_ours / t_lora,
        "pac_over_base": t_ours / t_base, "step_flops": step_flops, "ours_flop_s": step_flops / min(t_ours, t_unrolled),
        "cfg": cfg, "lc": lc, "batch": (b, s, resp),
    }
