"""benchmarks/predict.py --engines: this project and transformers + stock peft side by side, on the tiny model.

The independent reference check: transformers' own Qwen2 of the same weights, with the same plain LoRA loaded
by stock peft from our `--format peft` export, decodes greedily the same tokens as our Predictor on the same
prompts (the Predictor's, the authors' template). Their logits agree to ~1e-4 (tests/inference/
test_export_hf.py) and a random model's top two logits are far further apart than that, so every token must
agree, not most; the LoRA (weights ~ N(0, 0.2)) changes the base model's tokens, so the agreement covers it.
"""

from __future__ import annotations

import json

import pytest
from tests.script_loader import load_script

pytest.importorskip("torch", reason="torch (CPU) runs the transformers side")
pytest.importorskip("transformers")
pytest.importorskip("peft")


def _module():
    return load_script("benchmarks/predict.py", "bench_predict_sbs")


def test_side_by_side_greedy_tokens_agree_and_the_table_has_every_engine(tmp_path):
    mod = _module()
    md = tmp_path / "BENCH.md"
    md.write_text(f"# B\n\n{mod.BEGIN}\nthe throughput table\n{mod.END}\n", encoding="utf-8")
    out = tmp_path / "sbs.json"
    assert mod.main(["--models", "tiny", "--engines", "ours,hf_peft,hf_base", "--samples", "1", "--users", "3",
                     "--max_new_tokens", "6", "--greedy", "--adapter_scale", "0.2", "--repeats", "1",
                     "--hf_batch_size", "2", "--json", str(out), "--markdown", str(md)]) == 0
    rows = json.loads(out.read_text())["rows"]
    by = {r["engine"]: r for r in rows}
    assert set(by) == {"ours", "hf_peft", "hf_base"}
    for r in rows:
        assert r["users"] == 3 and r["samples"] == 1 and r["users_per_s"] > 0 and r["first_answer_s"] > 0
        assert 1 <= r["mean_new_tokens"] <= 6 and r["max_new_tokens_seen"] <= 6
        assert 0 < r["roofline_fraction"] and r["roofline"]["prefill_flops"] > 0
        assert len(r["tokens"]) == 3 and all(len(u) == 1 for u in r["tokens"])
    assert by["ours"]["tokens"] == by["hf_peft"]["tokens"]  # one call of 3 users vs transformers' 2 + 1
    assert by["hf_peft"]["batch_size"] == by["hf_base"]["batch_size"] == 2 and by["ours"]["batch_size"] > 2
    assert by["hf_peft"]["first_answer_s"] < by["hf_peft"]["seconds"]  # its first batch answers before the second
    assert by["hf_peft"]["same_tokens_as_ours"] == 1.0 and by["hf_peft"]["first_difference"] is None
    assert by["hf_peft"]["tokens"] != by["hf_base"]["tokens"]  # the LoRA matters: the agreement covers it

    text = md.read_text(encoding="utf-8")
    assert "the throughput table" in text  # the other section is kept
    assert text.count(mod.SBS_BEGIN) == 1 and text.count(mod.SBS_END) == 1
    table = [line for line in text.splitlines() if line.startswith("| tiny |")]
    assert [line.split(" | ")[1] for line in table] == ["ours", "hf_peft", "hf_base"]
    assert all(line.split(" | ")[9].split(" / ")[1] == "6" for line in table)  # new tokens (mean / max)
    assert [line.split(" | ")[10] for line in table] == [str(by["ours"]["batch_size"]), "2", "2"]  # users per call
    assert "tiny `hf_peft`'s tokens are ours in 100% of the sequences;" in text


def test_side_by_side_refuses_greedy_with_several_samples():
    mod = _module()
    with pytest.raises(SystemExit):
        mod.main(["--models", "tiny", "--engines", "ours,hf_peft", "--samples", "2", "--greedy", "--users", "2"])
    with pytest.raises(SystemExit):
        mod.main(["--models", "tiny", "--engines", "ours,vllm", "--users", "2"])
    for bad in (["--engines", "ours,hf_peft", "--prompt_mode", "full"], ["--hf_batch_size", "4"],
                ["--engines", "ours,hf_peft", "--hf_batch_size", "-1"], ["--models", "tiny@bfloat16", "--engines", "ours"]):
        with pytest.raises(SystemExit):
            mod.main(["--models", "tiny", "--users", "2", *bad])
