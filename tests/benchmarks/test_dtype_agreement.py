"""benchmarks/dtype_agreement.py: float32 and bfloat16 Predictors of one model, compared on the same users."""

from __future__ import annotations

from tests.script_loader import load_script


def test_first_difference():
    mod = load_script("benchmarks/dtype_agreement.py", "bench_dtype_agreement")
    assert mod.first_difference("abc", "abc") is None
    assert mod.first_difference("abcd", "abxd") == 2 and mod.first_difference("ab", "abc") == 2


def test_the_tiny_model_in_bfloat16_stays_within_rounding_of_float32():
    """The tiny random model through both Predictors: per-user head probabilities within bf16 rounding of the
    float32 ones, and the crowd distribution too (both sum to 1); a post per user."""
    mod = load_script("benchmarks/dtype_agreement.py", "bench_dtype_agreement")
    res = mod.compare("tiny", 2)
    assert res["users"] == 2 and len(res["first_difference"]) == 2 and len(res["post_lengths"]) == 2
    assert 0 < res["max_prob_diff"] < 2e-2  # > 0: bf16 really ran
    f32, bf16 = res["distribution"]["float32"], res["distribution"]["bfloat16"]
    assert abs(sum(f32) - 1) < 1e-5 and abs(sum(bf16) - 1) < 1e-3
    assert max(abs(a - b) for a, b in zip(f32, bf16)) < 2e-2
