"""benchmarks/gemm_dtype.py: its table states each rate it measured and the ratio of the two it compares."""

from __future__ import annotations

from tests.script_loader import load_script


def test_the_table_reports_rates_and_the_float32_out_speed_up(monkeypatch):
    mod = load_script("benchmarks/gemm_dtype.py", "bench_gemm_dtype")
    monkeypatch.setattr(mod, "SHAPES", {"toy": (16, 24)})
    monkeypatch.setattr(mod, "ROWS", (8,))
    gemms = mod.gemm_rates(repeats=1)  # real (tiny) products: three maps x one row count
    assert [(g["map"].split(" [")[0], g["k"], g["n"], g["rows"]) for g in gemms] == [
        ("d x d (q, o)", 16, 16, 8), ("d x mlp (gate, up)", 16, 24, 8), ("mlp x d (down)", 24, 16, 8)]
    assert all(g[k] > 0 for g in gemms for k in mod.KINDS)
    gemms[0].update({mod.KINDS[0]: 100.0, mod.KINDS[1]: 90.0, mod.KINDS[2]: 210.0})
    meta = {"command": "python benchmarks/gemm_dtype.py", "date": "D", "cpu": "cpu", "cores": 2, "avx512_bf16": "yes",
            "commit": "abc", "load_start": (0.1,), "load_end": (0.2,), "repeats": 1}
    text = mod.render(gemms, {"float32": 6.0, "bfloat16, matmul_out float32": 4.0}, meta,
                      {"float32": 1.0, "bfloat16, matmul_out float32": 0.8})
    row = [line for line in text.splitlines() if line.startswith("| toy | d x d")][0]
    assert row.split(" | ")[2:] == ["8 (weight-major)", "100", "90", "210", "2.10x", "2.33x |"]
    assert "| bfloat16, matmul_out float32 | 4.00 | 1.50x |" in text
    assert "| bfloat16, matmul_out float32 | 0.80 | 1.25x |" in text
    assert text.startswith(mod.BEGIN) and text.rstrip().endswith(mod.END)
