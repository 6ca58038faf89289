"""launch/score.py against Hugging Face transformers' log-probs, and its one-line errors."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from socialalign_jax.weights.hf import load_safetensors, save_safetensors

torch = pytest.importorskip("torch", reason="torch (CPU) is needed for the HF transformers reference")
pytest.importorskip("transformers")
from tests.helpers_hf import make_hf_model, save_hf_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCORE = ROOT / "launch" / "score.py"
sys.path.insert(0, str(ROOT / "launch"))
import score as score_cli  # noqa: E402

QWEN_VOCAB = 151936  # the real Qwen2 vocabulary, so the real (offline) tokenizer applies

RECORDS = [
    {"text": "今天的新闻让人很难过。#地震# 希望大家平安"},
    {"prompt": "请写一条微博：", "response": "支持！这个政策太好了", "id": 7},
    {"prompt": "News: a new bridge opened today.", "response": " Great news for commuters!"},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from socialalign_jax.weights.tokenizer import load_tokenizer
    model = make_hf_model("qwen2", seed=11, vocab=QWEN_VOCAB, tied=True, hidden=32, inter=64)
    d = save_hf_model(model, tmp_path_factory.mktemp("ck"))
    load_tokenizer().save_pretrained(str(d))
    return model, d


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from socialalign_jax.weights.tokenizer import load_tokenizer
    return load_tokenizer(checkpoint[1])


def _hf_reference(model, tok, prompt_text, response_text):
    """Log-probs of the response tokens by transformers on the unpadded sequence (or of all
    tokens after the first when prompt_text is None)."""
    if prompt_text is None:
        ids = tok.encode(response_text, add_special_tokens=False)
        first = 1
    else:
        p = tok.encode(prompt_text, add_special_tokens=False)
        ids, first = p + tok.encode(response_text, add_special_tokens=False), len(p)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return np.array([lp[t - 1, ids[t]].item() for t in range(first, len(ids))])


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_logprobs_match_hf(checkpoint, tokenizer, tmp_path, chat):
    model, ck = checkpoint
    records = RECORDS[1:] if chat else RECORDS
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    # --weights hf:DIR (the name every launcher uses), or a bare DIR
    model_flag = ["--weights", f"hf:{ck}"] if chat else ["--weights", str(ck)]
    argv = model_flag + ["--input", str(inp), "--out", str(out), "--batch_size", "2"]
    with pytest.raises(SystemExit) as e:
        score_cli.cli_main(score_cli.main, argv + (["--chat"] if chat else []))
    assert e.value.code == 0
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(got) == len(records)
    tok = tokenizer
    for rec, res in zip(records, got):
        assert {k: res[k] for k in rec} == rec  # input fields carried through unchanged
        if "text" in rec:
            ref = _hf_reference(model, tok, None, rec["text"])
        elif chat:  # ChatML written out by hand, independently of tokenizer.chat_template
            ref = _hf_reference(model, tok, f"<|im_start|>user\n{rec['prompt']}<|im_end|>\n<|im_start|>assistant\n",
                                rec["response"] + "<|im_end|>")
        else:
            ref = _hf_reference(model, tok, rec["prompt"], rec["response"])
        assert res["num_tokens"] == len(ref) == len(res["token_logprobs"]) > 1
        np.testing.assert_allclose(res["token_logprobs"], ref, rtol=0, atol=1e-4)
        assert res["sum_logprob"] == pytest.approx(ref.sum(), abs=1e-3)
        assert res["perplexity"] == pytest.approx(math.exp(-ref.sum() / len(ref)), rel=1e-3)


def _run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(SCORE), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def _assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _broken_copy(checkpoint, tmp_path, how):
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint[1], ck)
    if how == "no_config":
        (ck / "config.json").unlink()
        return ck, [f"{ck}/config.json", "no config.json"]
    if how == "unknown_arch":
        c = json.loads((ck / "config.json").read_text())
        c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        (ck / "config.json").write_text(json.dumps(c))
        return ck, [f"{ck}/config.json", "unsupported architecture"]
    if how == "shape":
        t = load_safetensors(ck / "model.safetensors")
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]
        save_safetensors(t, ck / "model.safetensors")
        return ck, [f"{ck}/model.safetensors", "'model.layers.0.self_attn.k_proj.weight'", "[8, 32]", "[16, 32]"]
    if how == "pickle_only":
        (ck / "model.safetensors").unlink()
        (ck / "pytorch_model.bin").write_bytes(b"\x80\x04 not loaded")
        return ck, [f"{ck}/pytorch_model.bin", "Convert", "safetensors"]
    raise ValueError(how)


@pytest.mark.parametrize("how", ["no_config", "unknown_arch", "shape", "pickle_only"])
def test_checkpoint_errors_are_one_line(checkpoint, tmp_path, how):
    ck, needles = _broken_copy(checkpoint, tmp_path, how)
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(RECORDS[0]) + "\n", encoding="utf-8")
    proc = _run_cli("--weights", ck, "--input", inp, "--out", tmp_path / "out.jsonl")
    _assert_one_line_error(proc, *needles)
    assert not (tmp_path / "out.jsonl").exists()


BAD_LINES = [
    ('{"text": "ok"', ["line 2", "invalid JSON"]),
    ('["text"]', ["line 2", "expected a JSON object"]),
    ('{"prompt": "p"}', ["line 2", "missing field 'response'"]),
    ('{"text": "a", "prompt": "b", "response": "c"}', ["line 2", "not both"]),
    ('{"prompt": "p", "response": 3}', ["line 2", "field 'response' must be a string"]),
    ('{"prompt": "p", "response": ""}', ["line 2", "field 'response' is empty"]),
    ('{"text": "x"}', ["line 2", "fewer than 2 tokens"]),
]


def test_input_errors_name_file_and_line(tokenizer, tmp_path):
    from socialalign_jax.core.errors import UserError
    from socialalign_jax.inference.scoring import encode_file
    inp = tmp_path / "in.jsonl"
    for line, needles in BAD_LINES:
        inp.write_text(json.dumps(RECORDS[0]) + "\n" + line + "\n", encoding="utf-8")
        with pytest.raises(UserError) as e:
            encode_file(tokenizer, inp, chat=False, vocab_size=QWEN_VOCAB, max_length=None)
        assert str(e.value).startswith(f"{inp}: "), line
        for n in needles:
            assert n in str(e.value), (line, str(e.value))
    # too long: an error, never a silent truncation
    inp.write_text(json.dumps(RECORDS[0], ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="line 1: .* exceed max_length 3 .*never truncated"):
        encode_file(tokenizer, inp, chat=False, vocab_size=QWEN_VOCAB, max_length=3)
    # a tokenizer id beyond the model's vocabulary (mismatched checkpoint) is named
    with pytest.raises(UserError, match="line 1: token id .* outside the model vocabulary"):
        encode_file(tokenizer, inp, chat=False, vocab_size=1000, max_length=None)


def test_malformed_input_via_cli(checkpoint, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(RECORDS[0], ensure_ascii=False) + "\n{oops\n", encoding="utf-8")
    proc = _run_cli("--weights", checkpoint[1], "--input", inp, "--out", tmp_path / "o.jsonl")
    _assert_one_line_error(proc, f"{inp}: line 2", "invalid JSON")
    assert not (tmp_path / "o.jsonl").exists()


def test_padded_vocab_is_masked_out_of_the_softmax(checkpoint, tokenizer, tmp_path):
    """V padded 151936 -> 152064 (Qwen2.5-7B's padding): zero rows would otherwise add mass."""
    from socialalign_jax.inference.scoring import encode_file, score_examples
    from socialalign_jax.weights.hf import load_hf_checkpoint
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS), encoding="utf-8")
    ex = encode_file(tokenizer, inp, chat=False, vocab_size=QWEN_VOCAB, max_length=None)
    cfg, params = load_hf_checkpoint(checkpoint[1])
    cfgp, paramsp = load_hf_checkpoint(checkpoint[1], vocab_multiple=256)
    assert cfgp.vocab_size == 152064
    ref = list(score_examples(params, cfg, ex, batch_size=4))
    got = list(score_examples(paramsp, cfgp, ex, batch_size=4, real_vocab=QWEN_VOCAB))
    unmasked = list(score_examples(paramsp, cfgp, ex, batch_size=4))
    for r, g, u in zip(ref, got, unmasked):
        np.testing.assert_allclose(g["token_logprobs"], r["token_logprobs"], rtol=0, atol=1e-5)
        assert u["sum_logprob"] < r["sum_logprob"] - 1e-4  # the masking is what makes them agree


def test_weights_other_than_hf_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        score_cli.parse_args(["--weights", "gguf:smollm2", "--input", "in.jsonl", "--out", "out.jsonl"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "give hf:DIR" in err[0], err
