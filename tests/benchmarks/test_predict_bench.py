"""benchmarks/predict.py's report: steady and first-call times side by side, a baseline run beside them."""

from __future__ import annotations

from tests.script_loader import load_script


def _module():
    return load_script("benchmarks/predict.py", "bench_predict")


def _row(model, k, steady, first, w=1, cost=None):
    return {"model": model, "samples": k, "wordings": w, "users": 8, "users_per_s": 8 / steady,
            "posts_per_s": 8 * k * w / steady, "seconds": steady, "first_s": first, "compile_s": first - steady,
            "prompt_bucket": 64, "max_new_tokens": 48, "batch_size": 16, "cost_vs_k1": cost}


def test_the_table_puts_each_rows_baseline_beside_it():
    mod = _module()
    meta = {"command": "python benchmarks/predict.py --samples 1,4", "date": "D", "devices": "cpu",
            "load_start": (2.0,), "load_end": (2.1,), "commit": "abc"}
    before = {"meta": {**meta, "commit": "old"}, "rows": [_row("smollm2", 4, 20.0, 50.0)]}
    del before["rows"][0]["wordings"]  # a run from before --wordings: one wording
    text = mod.render([_row("smollm2", 1, 4.0, 30.0, cost=1.0), _row("smollm2", 4, 8.0, 40.0, cost=2.0),
                       _row("smollm2", 4, 10.0, 40.0, w=2, cost=2.5)], meta, before)
    table = [line for line in text.splitlines() if line.startswith("| smollm2")]
    # K=1 has no baseline row; K=4's baseline: 8/20 = 0.40 users/s, steady 20.0 s, compile 30 s.
    assert table[0].split(" | ")[1:10] == ["1", "1", "8", "2.00", "2.00", "4.0", "1.00x", "30.0", "26"]
    assert table[0].split(" | ")[10:13] == ["-", "-", "-"]
    assert table[1].split(" | ")[1:13] == ["4", "1", "8", "1.00", "4.00", "8.0", "2.00x", "40.0", "32", "0.40",
                                           "20.0", "30"]
    # two wordings: 8 users x 4 posts x 2 wordings in 10 s; no baseline row for W=2
    assert table[2].split(" | ")[1:13] == ["4", "2", "8", "0.80", "6.40", "10.0", "2.50x", "40.0", "30", "-", "-",
                                           "-"]
    assert "at commit old" in text and "after: commit abc" in text and "cores were shared" in text
    head = [line for line in text.splitlines() if line.startswith("| model")][0].split(" | ")
    at = head.index("prefill tokens (real)")
    assert head[at + 1] == "prefill vs 1 wording" and table[2].split(" | ")[at:at + 2] == ["-", "-"]
    rows = [dict(_row("smollm2", 1, 4.0, 30.0, cost=1.0), prefill_tokens=3000, prefill_vs_w1=1.0),
            dict(_row("smollm2", 1, 7.0, 30.0, w=2, cost=1.75), prefill_tokens=5280, prefill_vs_w1=1.76)]
    lines = mod.render(rows, meta).splitlines()
    at = [line for line in lines if line.startswith("| model")][0].split(" | ").index("prefill tokens (real)")
    cells = [line.split(" | ")[at:at + 2] for line in lines if line.startswith("| smollm2")]
    assert cells == [["3000", "1.00x"], ["5280", "1.76x"]]
    idle = mod.render([_row("smollm2", 1, 4.0, 30.0)], {**meta, "load_start": (0.1,)})
    assert "users/s before" not in idle and "cores were shared" not in idle and "(idle)" in idle


def test_bench_predicts_under_each_wording_and_states_cost_against_one_post_one_wording(monkeypatch):
    """bench() with a stand-in Predictor: which wordings each call passes, and cost = steady / steady(K=1, W=1)."""
    mod = _module()
    calls = []
    clock = [0.0]

    class FakePredictor:
        batch_size = 16
        sampling = type("S", (), {"max_new_tokens": 48})()
        prompt_cfg = type("P", (), {"mode": "full"})()

        lora_cfg = None  # causal: a user's wordings share their head

        def __init__(self):
            self.compiled_shapes = set()

        def build_prompts(self, wordings, topic, users):  # [W][U]: 3 shared tokens (the user span), 2 of wording
            return [[{"input_ids": [1, 2, 3, 10 + v, 11 + v, 0], "prompt_len": 5, "user_end": 3} for _ in users]
                    for v in range(len(wordings))]

        def predict(self, news, users, *, samples, seed, variants):
            self.compiled_shapes.add((16, samples, 0, 64))  # (prompts, K, shared prefix, prompt slots)
            calls.append((news, samples, tuple(variants)))
            clock[0] += samples * (1 + len(variants))  # a call "takes" K x W seconds

    built = []
    monkeypatch.setattr(mod, "build_predictor", lambda *a: built.append(a) or FakePredictor())
    monkeypatch.setattr(mod.time, "perf_counter", lambda: clock[0])
    rows = mod.bench("tiny", [1, 4], ["u"] * 8, repeats=2, wordings=[1, 2], prompt_mode="full")
    assert built == [("tiny", 0, "full")] and {r["prompt_mode"] for r in rows} == {"full"}
    assert [(r["samples"], r["wordings"]) for r in rows] == [(1, 1), (1, 2), (4, 1), (4, 2)]
    assert {c[2] for c in calls} == {(), (mod.WORDINGS[1],)} and all(c[0] == mod.NEWS for c in calls)
    # A compiling call per (K, W), then the timed calls round-robin: (1,1) (1,2) (4,1) (4,2), twice.
    order = [(c[1], len(c[2]) + 1) for c in calls]
    assert order == [(1, 1), (1, 2), (4, 1), (4, 2)] * 3
    assert [r["cost_vs_k1"] for r in rows] == [1.0, 2.0, 4.0, 8.0]
    assert rows[3]["posts_per_s"] == 8 * 4 * 2 / 8.0 and rows[3]["users_per_s"] == 1.0
    assert [r["decode_rows"] for r in rows] == [16, 16, 64, 64] and rows[0]["prompt_bucket"] == 64
    # Prefill tokens without padding: 8 users x 5 under one wording; 8 x (3 shared + 2 + 2) under two.
    assert [r["prefill_tokens"] for r in rows] == [40, 56, 40, 56]
    assert [r["prefill_vs_w1"] for r in rows] == [1.0, 1.4, 1.0, 1.4]


def test_cost_is_the_median_of_ratios_of_calls_made_in_the_same_round(monkeypatch):
    """A machine that slows down between rounds: the cost pairs each call with K = 1's of its round."""
    mod = _module()
    clock = [0.0]
    # first calls (W = 1, W = 2), then rounds of (W = 1, W = 2): (10, 20), (11, 40), (30, 33)
    durations = iter([100.0, 100.0, 10.0, 20.0, 11.0, 40.0, 30.0, 33.0])

    class FakePredictor:
        batch_size, lora_cfg = 16, None
        sampling = type("S", (), {"max_new_tokens": 48})()
        prompt_cfg = type("P", (), {"mode": "without_history"})()
        compiled_shapes = set()

        def build_prompts(self, wordings, topic, users):
            return [[{"input_ids": [1, 2], "prompt_len": 2, "user_end": 1} for _ in users] for _ in wordings]

        def predict(self, news, users, *, samples, seed, variants):
            self.compiled_shapes.add((16, samples, 0, 64))
            clock[0] += next(durations)

    monkeypatch.setattr(mod, "build_predictor", lambda *a: FakePredictor())
    monkeypatch.setattr(mod.time, "perf_counter", lambda: clock[0])
    rows = mod.bench("tiny", [1], ["u"] * 8, repeats=3, wordings=[1, 2])
    assert [r["times"] for r in rows] == [[10.0, 11.0, 30.0], [20.0, 40.0, 33.0]]
    assert [r["seconds"] for r in rows] == [11.0, 33.0]  # medians: their ratio would say 3x
    assert [r["cost_vs_k1"] for r in rows] == [1.0, 2.0]  # the rounds' ratios 2, 40/11, 1.1: median 2


def test_random_models_are_presets_on_random_weights_of_their_shape():
    """`tiny` and `random-0.5b` (what a lent GPU runs: no weight file there) resolve to a preset of
    configs/weibo.py with random weights of the named shape; a preset name is itself."""
    mod = _module()
    big = mod._config("random-0.5b")
    assert big.model.weights == "random:qwen2.5-0.5b" and big.data.max_length == mod._config("0.5b").data.max_length
    assert mod._config("tiny").model.weights == "random:tiny-qwen2"
    assert mod._config("smollm2").model.weights == "gguf:smollm2"


def test_a_model_named_with_a_dtype_is_the_preset_computed_in_it():
    """`--models smollm2@bfloat16`: configs/weibo.py:smollm2 with model.dtype bfloat16 (what launch/predict.py
    --dtype gives a run), everything else the preset's; a bad dtype is the run config's one-line error."""
    import pytest

    from socialalign_jax.runs.validation import validate_run_config

    mod = _module()
    plain, bf16 = mod._config("smollm2"), mod._config("smollm2@bfloat16")
    assert plain.model.dtype == "float32" and bf16.model.dtype == "bfloat16"
    assert bf16.replace(model={"dtype": "float32"}) == plain
    assert mod._config("tiny@bfloat16").model.weights == "random:tiny-qwen2"
    with pytest.raises(ValueError, match="model.dtype"):
        validate_run_config(mod._config("smollm2@int8"), device_count=1, training=False)


def test_roofline_cost_is_the_least_time_of_a_rows_work_hand_counted():
    """call_roofline: prefill FLOPs of the real tokens (2 x layer params each, one LM-head row a prompt), then
    per call of batch_size prompts max_new_tokens - 1 steps of max(FLOPs / rate, weight bytes / bandwidth);
    counted here by hand from the config's dimensions."""
    from socialalign_jax.model.config import ModelConfig

    mod = _module()
    mc = ModelConfig("llama", vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16)
    layer = 2 * (64 * 64 + 64 * 64 + 64 * 32 + 64 * 32 + 3 * 64 * 128)  # q, o, k, v (2 kv heads x 16), mlp
    head = 1000 * 64
    rates = {"matmul_flops_per_s": 1e9, "bandwidth_bytes_per_s": 2e8}
    row = {"users": 3, "wordings": 2, "samples": 4, "batch_size": 4, "max_new_tokens": 11, "prefill_tokens": 500}
    prefill = (2 * layer * 500 + 2 * head * 6) / 1e9
    step = lambda rows: max(2 * (layer + head) * rows / 1e9, 4 * (layer + head) / 2e8)  # noqa: E731
    want = prefill + 10 * (step(4 * 4) + step(2 * 4))  # 6 prompts: calls of 4 and 2, K = 4 rows each
    assert abs(mod.call_roofline(mc, row, rates) - want) < 1e-12 * want
    assert 2 * (layer + head) * 16 / 1e9 > 4 * (layer + head) / 2e8 > 2 * (layer + head) * 8 / 1e9  # both roofs bind
