"""benchmarks/zeroshot.py end to end on the tiny random Qwen2: both paths label the same posts
with the same probabilities, and the JSON holds the figures BENCHMARKS.md quotes."""

from __future__ import annotations

import json
from tests.script_loader import load_script



def test_zeroshot_bench_runs_both_paths_and_they_agree(tmp_path, capsys):
    mod = load_script("benchmarks/zeroshot.py", "bench_zeroshot")
    out = tmp_path / "zs.json"
    assert mod.main(["--weights", "random:tiny-qwen2", "--texts", "5", "--repeats", "1", "--batch_size", "4",
                     "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["texts"] == 5 and got["command"].endswith("--json " + str(out))
    assert got["max_prob_diff"] < 1e-4  # the same numbers by two routes
    for mode in ("pairs", "cached"):
        assert got[mode]["steady_s"] > 0 and len(got[mode]["times"]) == 1
    assert abs(got["ratio"] - got["pairs"]["steady_s"] / got["cached"]["steady_s"]) < 1e-12
    assert "pairs / cached:" in capsys.readouterr().out
