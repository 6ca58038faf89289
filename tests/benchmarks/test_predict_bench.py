"""benchmarks/predict.py's report: steady and first-call times side by side, a baseline run beside them."""

from __future__ import annotations

from tests.script_loader import load_script



def _module():
    return load_script("benchmarks/predict.py", "bench_predict")


def _row(model, k, steady, first):
    return {"model": model, "samples": k, "users": 8, "users_per_s": 8 / steady, "posts_per_s": 8 * k / steady,
            "seconds": steady, "first_s": first, "compile_s": first - steady, "prompt_bucket": 64,
            "max_new_tokens": 48, "batch_size": 16}


def test_the_table_puts_each_rows_baseline_beside_it():
    mod = _module()
    meta = {"command": "python benchmarks/predict.py --samples 1,4", "date": "D", "devices": "cpu",
            "load_start": (2.0,), "load_end": (2.1,), "commit": "abc"}
    before = {"meta": {**meta, "commit": "old"}, "rows": [_row("smollm2", 4, 20.0, 50.0)]}
    text = mod.render([_row("smollm2", 1, 4.0, 30.0), _row("smollm2", 4, 8.0, 40.0)], meta, before)
    table = [line for line in text.splitlines() if line.startswith("| smollm2")]
    # K=1 has no baseline row; K=4's baseline: 8/20 = 0.40 users/s, steady 20.0 s, compile 30 s.
    assert table[0].split(" | ")[1:8] == ["1", "8", "2.00", "2.00", "4.0", "30.0", "26"]
    assert table[0].split(" | ")[8:11] == ["-", "-", "-"]
    assert table[1].split(" | ")[1:11] == ["4", "8", "1.00", "4.00", "8.0", "40.0", "32", "0.40", "20.0", "30"]
    assert "at commit old" in text and "after: commit abc" in text
    assert "users/s before" not in mod.render([_row("smollm2", 1, 4.0, 30.0)], meta)
