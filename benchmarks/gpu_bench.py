"""The GPU variant of the benchmarks: bfloat16, ours vs PyTorch on the same card (run by gpu.sh).

    python benchmarks/gpu_bench.py --preset qwen2.5-0.5b [--layers 4 --batch 8 --seq 1024] [--smoke]

Layer fwd+bwd and training step as in run.py sections 1-3, in bfloat16 compute with float32
adapters on both sides, and MFU against the card's dense bf16 peak (train/flops.py table).
--smoke runs tiny shapes on whatever device exists (a CPU check that the script works).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="qwen2.5-0.5b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--resp", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)

    import jax
    import numpy as np
    import optax
    import torch

    from benchmarks import common, train_step as ts
    from benchmarks.torch_ref import pac_lora as tref
    from socialalign_jax import pac_lora
    from socialalign_jax.presets import get_preset
    from socialalign_jax.train import flops, step as step_lib

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.preset, args.layers, args.batch, args.seq, args.resp, args.repeats = "tiny-qwen2", 1, 2, 64, 16, 2
    cfg = get_preset(args.preset, num_layers=args.layers, dtype="bfloat16", param_dtype="bfloat16")
    lc = pac_lora.LoraConfig()
    loss_cfg = step_lib.LossConfig(max_response_tokens=args.resp)
    params = common.init_params(cfg)
    adapters = common.random_adapters(cfg, lc)
    batch = ts.make_batch(args.batch, args.seq, args.resp)
    jbatch = jax.device_put(batch)

    opt = optax.adamw(1e-4, weight_decay=0.01)
    step = jax.jit(step_lib.make_train_step(cfg, lc, loss_cfg, opt), donate_argnums=(1,))
    box = {"s": step_lib.init_train_state(adapters, opt)}

    def ours():
        box["s"], m = step(params, box["s"], jbatch, jax.random.PRNGKey(0))
        common.block(m)

    hf = common.hf_model_from(jax.tree.map(lambda a: np.asarray(a, np.float32), params), cfg.replace(dtype="float32"))
    routing = tref.Routing()
    mods = tref.inject(hf, routing, dropout=lc.dropout)
    tref.load_adapters(hf, adapters)
    hf = hf.to(dev)
    for n_, p_ in hf.named_parameters():  # frozen base in bf16, adapters float32 (as ours)
        if not p_.requires_grad:
            p_.data = p_.data.to(torch.bfloat16)
    head = torch.nn.Linear(cfg.hidden_size, lc.num_classes).to(dev)
    trainable = [q for m in mods for q in m.parameters() if q.requires_grad] + list(head.parameters())
    opt_t = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
    tbatch = dict(batch)

    def theirs():
        opt_t.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss, _ = _torch_loss_on(torch, hf, head, tbatch, routing, dev)
        loss.backward()
        opt_t.step()
        if dev == "cuda":
            torch.cuda.synchronize()

    t_ours = common.median_time(ours, args.repeats, warmup=2)[0]
    t_torch = common.median_time(theirs, args.repeats, warmup=2)[0]
    step_flops = flops.train_step_flops(cfg, lc, args.batch, args.seq, args.resp, lc.num_classes)
    peak = flops.peak_flops_for(jax.devices()[0].device_kind) or float("nan")
    out = {"device": jax.devices()[0].device_kind, "torch_device": dev, "preset": args.preset, "layers": args.layers,
           "batch": [args.batch, args.seq, args.resp], "ours_s": t_ours, "torch_s": t_torch,
           "speedup": t_torch / t_ours, "ours_tok_s": args.batch * args.seq / t_ours,
           "torch_tok_s": args.batch * args.seq / t_torch, "mfu_vs_bf16_peak": step_flops / t_ours / peak}
    print(json.dumps(out))
    return 0


def _torch_loss_on(torch, hf, head, batch, routing, dev):
    """run.py's objective, with the ids on `dev` (same maths as train_step.torch_loss)."""
    from benchmarks.torch_ref import pac_lora as tref
    ids = torch.from_numpy(batch["input_ids"]).long().to(dev)
    b, s = ids.shape
    pos = torch.arange(s, device=dev)[None].expand(b, s)
    routing.seg = tref.segment_ids(pos, torch.from_numpy(batch["user_end"]).to(dev),
                                   torch.from_numpy(batch["news_end"]).to(dev))
    hidden = hf.model(input_ids=ids).last_hidden_state
    p = int(batch["prompt_len"][0])
    logits = hf.lm_head(hidden[:, p - 1:s - 1]).float()
    lm = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, p:].reshape(-1))
    sl = head(hidden[:, p - 1].float())
    sent = torch.nn.functional.cross_entropy(sl, torch.from_numpy(batch["label"]).long().to(dev))
    return lm + sent, (lm, sent)


if __name__ == "__main__":
    sys.exit(main())
