"""Batch generation (socialalign_jax.inference.generation) and its CLI.

References: a cache-free full forward per example (head probabilities, response log-probs in
numpy), single-example unpadded generation (batching, bucketing and filler rows change
nothing), and launch/evaluate.py's own reader (the JSONL is what the evaluator accepts).
"""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from socialalign_jax.core.labels import DEFAULT_LABELS
from socialalign_jax.inference import generation
from socialalign_jax.model import sampling
from socialalign_jax.model.sampling import SamplingConfig
from socialalign_jax.model import decoder
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.pac_lora import LoraConfig
from socialalign_jax.runs import restore
from socialalign_jax.runs.run_config import as_run_config
from socialalign_jax.weights.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = ModelConfig("qwen2", vocab_size=101, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, rope_theta=10000.0, tie_embeddings=True)
LC = LoraConfig(rank=4, gate_width=8, routing="pooled", targets=("q", "v", "down"))
PAD = 0


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def setup():
    params = decoder.init_params(CFG, jax.random.PRNGKey(0))
    ad = decoder.init_adapters(jax.random.PRNGKey(1), CFG, LC)
    ad = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * jax.random.normal(jax.random.PRNGKey(len(jax.tree_util.keystr(p))), x.shape)
        if jax.tree_util.keystr(p).endswith("['B']") else x, ad)
    ad["head"]["bias"] = ad["head"]["bias"] + 0.5 * jax.numpy.arange(3.0)  # a non-trivial head
    rng = np.random.default_rng(0)
    examples = []
    for i, (p, r) in enumerate([(9, 4), (5, 6), (12, 3)]):
        ids = rng.integers(1, CFG.vocab_size, p + r).astype(np.int32)
        examples.append({
            "input_ids": ids, "loss_mask": (np.arange(p + r) >= p).astype(np.uint8), "prompt_len": np.int32(p),
            "user_end": np.int32(2 + i % 2), "news_end": np.int32(p - 2), "label": np.int32(i - 1),
            "event_id": np.int32(7), "event": "事件".encode(), "user": f"user{i}".encode(),
            "response": f"回复{i}".encode(), "case_index": np.int32(i),
            "target_dist": np.array([0.2, 0.3, 0.5], np.float32)})
    return params, ad, examples


def _greedy(max_new=5):
    return SamplingConfig(greedy=True, max_new_tokens=max_new, stop_tokens=(), pad_id=PAD)


def test_predictions_match_unbatched_references(setup, tok):
    params, ad, examples = setup
    scfg = _greedy()
    gates = generation.GateAccumulator()
    recs = list(generation.generate_predictions(params, ad, CFG, LC, scfg, examples, tok, batch_size=2,
                                                progress=False, gates=gates))
    assert len(recs) == 3
    for i, (rec, ex) in enumerate(zip(recs, examples)):
        ids = ex["input_ids"]
        p = int(ex["prompt_len"])
        spans = (np.array([ex["user_end"]]), np.array([ex["news_end"]]))
        # Generation alone, one unpadded prompt: batching and padding must not change the tokens.
        one = sampling.generate(params, ad, ids[None, :p], np.ones((1, p), np.int32), CFG, LC, scfg, spans,
                                jax.random.PRNGKey(0))
        assert rec["generated"] == tok.decode(np.asarray(one.tokens[0]).tolist(), skip_special_tokens=True)
        assert rec["generated_tokens"] == 5
        # Full forward over prompt + response, no cache, no padding.
        full = decoder.forward(params, ids[None], CFG, adapters=ad, lora_cfg=LC, spans=spans)
        head = np.asarray(decoder.sentiment_logits(full.hidden, np.array([p]), ad["head"]))[0]
        want = np.exp(head - head.max()) / np.exp(head - head.max()).sum()
        np.testing.assert_allclose(rec["probs"], want, atol=1e-5)
        logits = np.asarray(full.logits[0], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        ref = sum(logp[t - 1, ids[t]] for t in range(p, len(ids)))
        np.testing.assert_allclose(rec["ref_logprob_sum"], ref, rtol=1e-5)
        assert rec["ref_num_tokens"] == len(ids) - p
        assert rec["label"] == (None if i == 0 else DEFAULT_LABELS[i - 1])
        assert rec["prompt_id"] == f"7:{i}" and rec["event"] == "事件" and rec["reference"] == f"回复{i}"

    # Gate statistics: counts are the real tokens per segment, weights are distributions.
    g = gates.summary()
    assert g["modules"] == ["q", "v", "down"] and g["layers"] == CFG.num_layers
    a, counts = np.array(g["gate_a"]), np.array(g["tokens"])
    assert a.shape == (2, 3, 3, 3)
    user = sum(int(ex["user_end"]) for ex in examples)
    news = sum(int(ex["news_end"] - ex["user_end"]) for ex in examples)
    other = sum(len(ex["input_ids"]) - int(ex["news_end"]) for ex in examples)
    np.testing.assert_array_equal(counts[0, 0], [user, news, other])
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)


def test_output_is_accepted_by_the_evaluator(setup, tok, tmp_path):
    params, ad, examples = setup
    recs = generation.generate_predictions(params, ad, CFG, LC, _greedy(3), examples, tok, batch_size=4,
                                           progress=False)
    path = tmp_path / "preds.jsonl"
    assert generation.write_jsonl(recs, path) == 3
    spec = importlib.util.spec_from_file_location("evaluate_cli", os.path.join(ROOT, "launch", "evaluate.py"))
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    loaded = ev.load_predictions(str(path))
    assert [r["user"] for r in loaded] == ["user0", "user1", "user2"]
    assert loaded[0]["target_dist"] == pytest.approx([0.2, 0.3, 0.5])


def test_sampling_is_reproducible_per_seed(setup, tok):
    params, ad, examples = setup
    scfg = SamplingConfig(max_new_tokens=8, stop_tokens=(), pad_id=PAD, temperature=1.5, top_k=0, top_p=1.0,
                          seed=3)
    run = lambda s: [r["generated"] for r in generation.generate_predictions(  # noqa: E731
        params, ad, CFG, LC, s, examples, tok, batch_size=3, progress=False, score_reference=False)]
    first = run(scfg)
    assert run(scfg) == first
    assert run(scfg.replace(seed=4)) != first


@pytest.mark.parametrize("field,value,message", [
    ("prompt_len", 0, "field 'prompt_len'"),
    ("news_end", 99, "field 'news_end'"),
    ("input_ids", np.array([1, 2, 500], np.int32), "field 'input_ids'"),
    ("loss_mask", np.ones(3, np.uint8), "field 'loss_mask'"),
])
def test_bad_example_names_index_and_field(setup, tok, field, value, message):
    params, ad, examples = setup
    bad = [dict(examples[0]), dict(examples[1])]
    if field == "loss_mask":
        bad[1]["input_ids"] = bad[1]["input_ids"][:3]
        bad[1]["prompt_len"] = np.int32(2)
        bad[1]["user_end"], bad[1]["news_end"] = np.int32(1), np.int32(2)
        bad[1]["loss_mask"] = np.ones(3, np.uint8)
    else:
        bad[1][field] = value
    with pytest.raises(generation.GenerationError, match=rf"^test\.jsonl: example 1: {message}"):
        list(generation.generate_predictions(params, ad, CFG, LC, _greedy(2), bad, tok, batch_size=4,
                                             progress=False, source_name="test.jsonl"))


# ---------------------------------------------------------------------------------- the CLI


def _tiny_run_config(events_dir):
    import importlib.util as iu
    spec = iu.spec_from_file_location("weibo_config", os.path.join(ROOT, "configs", "weibo.py"))
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    cfg.model.weights = "random:tiny-qwen2"
    cfg.data.input = str(events_dir)
    cfg.data.test_fraction = 0.5
    cfg.lora.rank, cfg.lora.gate_width, cfg.lora.targets = 2, 4, "q,v"
    return as_run_config(cfg)


def _cli(args, tmp_path):
    import subprocess
    import sys
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "generate.py"), *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_cli_restores_the_checkpoint_and_writes_predictions(tmp_path):
    """Build a 2-event dataset, fail cleanly without a checkpoint, then generate from a saved one."""
    from socialalign_jax.runs import checkpoint
    from socialalign_jax.train import loop, optim, step as step_lib

    sample = os.path.join(ROOT, "socialalign_jax", "data", "sample", "events")
    events = tmp_path / "events"
    events.mkdir()
    for name in sorted(os.listdir(sample))[:2]:
        ev = json.load(open(os.path.join(sample, name), encoding="utf-8"))
        ev["cases"] = ev["cases"][:3]
        (events / name).write_text(json.dumps(ev, ensure_ascii=False), encoding="utf-8")
    cfg = _tiny_run_config(events)
    work = tmp_path / "run"
    job = loop.build_job(cfg, str(work))  # builds the dataset into run/data
    overrides = ["--config", os.path.join(ROOT, "configs", "weibo.py"), "--workdir", str(work),
                 "--config.model.weights=random:tiny-qwen2", f"--config.data.input={events}",
                 "--config.data.test_fraction=0.5", "--config.lora.rank=2", "--config.lora.gate_width=4",
                 "--config.lora.targets=q,v", "--config.sample.max_new_tokens=3", "--config.sample.batch_size=2",
                 "--noprogress"]

    res = _cli(overrides + ["--out", str(tmp_path / "p.jsonl")], tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no checkpoint" in lines[0] and "Traceback" not in res.stderr
    res = _cli(overrides + ["--out", str(tmp_path / "p.jsonl"), "--max_examples", "-1"], tmp_path)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: --max_examples -1: expected a count >= 0 (0 = all)"], res.stderr  # not silently 'all'

    # A checkpoint whose head strongly prefers 'negative', so the CLI must really use it.
    ad = decoder.init_adapters(jax.random.PRNGKey(0), job.model_cfg, job.lora_cfg)
    ad["head"]["bias"] = jax.numpy.array([4.0, 0.0, -4.0])
    optimizer, _ = optim.make_optimizer(cfg.optim, 10)
    manager = checkpoint.make_manager(str(work), save_every=1, keep=1, async_save=False)
    checkpoint.save(manager, 3, step_lib.init_train_state(ad, optimizer), {}, restore.config_to_dict(cfg), force=True)
    manager.wait_until_finished()

    # Without --config, the run's saved config.json is the config (written here as training
    # writes it, with 5 new tokens): no training override is repeated, and a --config.* override
    # on the command line still applies (3 tokens below).
    from socialalign_jax.core.atomic_io import write_json
    saved = restore.config_to_dict(cfg)
    saved["sample"]["max_new_tokens"], saved["sample"]["batch_size"] = 5, 2
    write_json(saved, str(work / "config.json"))
    out = tmp_path / "preds.jsonl"
    # --greedy with temperature 0: greedy decoding reads no temperature, so the pair is accepted
    res = _cli(["--workdir", str(work), "--config.sample.max_new_tokens=3", "--noprogress", "--out", str(out),
                "--greedy", "--config.sample.temperature=0", "--gates_out", str(tmp_path / "g.json")], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "checkpoint step 3" in res.stdout
    recs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    test = job.data.test if job.data is not None else None
    assert test is not None and len(recs) == len(test) == 3
    for rec, i in zip(recs, range(len(test))):
        ex = test[i]
        p = int(ex["prompt_len"])
        full = decoder.forward(job.params, np.asarray(ex["input_ids"])[None, :p], job.model_cfg, adapters=ad,
                               lora_cfg=job.lora_cfg, spans=(np.array([ex["user_end"]]), np.array([ex["news_end"]])))
        head = np.asarray(decoder.sentiment_logits(full.hidden, np.array([p]), ad["head"]))[0]
        np.testing.assert_allclose(rec["probs"], np.exp(head) / np.exp(head).sum(), atol=1e-5)
        assert rec["labels"] == ["negative", "neutral", "positive"]
        assert rec["label"] == rec["labels"][int(ex["label"])]
        assert rec["reference"] == bytes(ex["response"]).decode("utf-8")
        assert rec["generated_tokens"] <= 3
    assert max(r["generated_tokens"] for r in recs) == 3  # the override, not the saved 5
    gates = json.load(open(tmp_path / "g.json"))
    assert gates["modules"] == ["q", "v"] and np.array(gates["gate_a"]).shape == (2, 2, 3, 3)
