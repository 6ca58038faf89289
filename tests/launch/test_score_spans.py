"""launch/score.py --adapters routes a PAC-LoRA adapter by the user/news spans, as in training.

Reference: Hugging Face transformers (PyTorch) with every adapted projection replaced by a
PAC-LoRA module written here from the original's semantics (modeling_pac_lora/pac_lora_layer.py
in Znull-1220/SocialAlign): gate_a reads x on [user_mask, news_mask), gate_b on [0, user_mask),
where user_mask / news_mask are the first tokens of the two markers in the rendered ChatML text
(the original finds them with str.find on the whole prompt). The rendered text is written by
hand, the spans come from the HF tokenizer's own offsets, and the adapter is a random one in the
original's file layout: nothing on the reference side goes through our package.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (CPU) is needed for the PyTorch reference")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import save_file  # noqa: E402

from tests.authors_prompt import authors_chat, authors_instruction  # noqa: E402
from tests.helpers_hf import make_hf_model, save_hf_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "launch"))
import score as score_cli  # noqa: E402

QWEN_VOCAB = 151936
HIDDEN, INTER, LAYERS = 32, 64, 2
Q, KV = 32, 16  # 4 heads of 8, 2 kv heads
DIMS = {"q_proj": (HIDDEN, Q), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV), "o_proj": (Q, HIDDEN),
        "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}
BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
R, E, G, ALPHA = 4, 3, 32, 8.0
USER_MARKER, NEWS_MARKER = "现在你看到了一则新闻", "，请发一条关于hashtag"

RAW_CASE = {"user_name": "小红", "user_persona": "喜欢猫的大学生，乐观开朗",
            "history": [{"text": "今天阳光真好"}, {"text": "说得对", "retweet": {"text": "原微博内容"}},
                        {"text": "猫咪好可爱"}, {"text": "加班到很晚"}, {"text": "周末去公园散步"}]}
INSTRUCTION = authors_instruction(RAW_CASE, "猫咪", "猫咪救主的故事，消防员赶到现场。", "full")
RESPONSE = "太感人了！#猫咪#"


def original_adapter(seed: int = 3) -> dict:
    """A random PAC-LoRA 3x3 in the original's saved layout ([out, in] tensors, '.default.weight')."""
    rng = np.random.default_rng(seed)
    sd = {}
    for layer in range(LAYERS):
        for proj, (d_in, d_out) in DIMS.items():
            pre = f"base_model.model.model.layers.{layer}.{BLOCK[proj]}.{proj}."
            for n in ("lora_A", "lora_A1", "lora_A2"):
                sd[pre + n + ".default.weight"] = rng.normal(0, 0.3, (R, d_in)).astype(np.float32)
            for n in ("lora_B", "lora_B1", "lora_B2"):
                sd[pre + n + ".default.weight"] = rng.normal(0, 0.3, (d_out, R)).astype(np.float32)
            for k in "AB":
                sd[pre + f"lora_{k}_gate_dense1.default.weight"] = rng.normal(0, 1.0, (G, d_in)).astype(np.float32)
                sd[pre + f"lora_{k}_gate_dense2.default.weight"] = rng.normal(0, 1.0, (E, G)).astype(np.float32)
    return sd


class RefPacLora(torch.nn.Module):
    """The original's PAC-LoRA forward (eval mode) for one projection, with the original's masks."""

    def __init__(self, base, sd, prefix):
        super().__init__()
        self.base, self.spans = base, None  # spans: (user_mask, news_mask) ints, set per forward
        w = lambda n: torch.tensor(sd[prefix + n + ".default.weight"])  # noqa: E731
        self.A = torch.stack([w(n) for n in ("lora_A", "lora_A1", "lora_A2")])  # [E, r, d_in]
        self.B = torch.stack([w(n) for n in ("lora_B", "lora_B1", "lora_B2")])  # [E, d_out, r]
        self.ga = (w("lora_A_gate_dense1"), w("lora_A_gate_dense2"))
        self.gb = (w("lora_B_gate_dense1"), w("lora_B_gate_dense2"))

    def forward(self, x):  # [1, s, d_in]
        s = x.shape[1]
        user_mask, news_mask = self.spans
        idx = torch.arange(s)
        not_user = ~(idx < user_mask)
        not_news = ~((idx >= user_mask) & (idx < news_mask))
        x_news = x.masked_fill(not_news[None, :, None], 0)
        x_user = x.masked_fill(not_user[None, :, None], 0)
        gate = lambda v, g: torch.softmax(torch.nn.functional.gelu(v @ g[0].T) @ g[1].T, -1)  # noqa: E731
        wa, wb = gate(x_news, self.ga), gate(x_user, self.gb)  # [1, s, E]
        h = torch.einsum("bse,bser->bsr", wa, torch.einsum("bsd,erd->bser", x, self.A))
        out = torch.einsum("bse,bseo->bso", wb, torch.einsum("bsr,eor->bseo", h, self.B))
        return self.base(x) + (ALPHA / R) * out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from socialalign_jax.weights.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("spans")
    model = make_hf_model("qwen2", seed=4, vocab=QWEN_VOCAB, tied=True, hidden=HIDDEN, inter=INTER)
    ck = save_hf_model(model, d / "ck")
    load_tokenizer().save_pretrained(str(ck))
    sd = original_adapter()
    (d / "orig").mkdir()
    save_file(sd, str(d / "orig" / "adapter_model.safetensors"), metadata={"format": "pt"})
    (d / "orig" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.1, "target_modules": list(DIMS)}))
    mods = []
    for i, layer in enumerate(model.model.layers):
        for proj in DIMS:
            parent = getattr(layer, BLOCK[proj])
            m = RefPacLora(getattr(parent, proj), sd, f"base_model.model.model.layers.{i}.{BLOCK[proj]}.{proj}.")
            setattr(parent, proj, m)
            mods.append(m)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(ck))
    return model, mods, hf_tok, ck, d / "orig"


def reference(setup, prompt_text, response_text, spans="markers"):
    """Response log-probs by the torch reference; spans from str.find of the markers (the original's rule)."""
    model, mods, hf_tok, _, _ = setup
    enc = hf_tok(prompt_text, add_special_tokens=False, return_offsets_mapping=True)
    p_ids = enc["input_ids"]
    if spans == "markers":
        first_token = lambda c: next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a <= c < b)  # noqa: E731
        spans = (first_token(prompt_text.find(USER_MARKER)), first_token(prompt_text.find(NEWS_MARKER)))
    for m in mods:
        m.spans = spans
    ids = p_ids + hf_tok(response_text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return np.array([lp[t - 1, ids[t]].item() for t in range(len(p_ids), len(ids))]), spans


def _score(setup, tmp_path, records, *flags):
    """token_logprobs per record from launch/score.py --adapters (the original-layout adapter)."""
    _, _, _, ck, adapter = setup
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as e:
        score_cli.cli_main(score_cli.main, ["--weights", str(ck), "--input", str(inp), "--out", str(out),
                                            "--adapters", str(adapter), "--batch_size", "2", *flags])
    assert e.value.code == 0
    return [np.array(json.loads(line)["token_logprobs"]) for line in out.read_text(encoding="utf-8").splitlines()]


FREE_PROMPT = "用户小红的历史：喜欢猫。新闻：猫咪救主的故事。请写一条微博："
RECORDS = [
    {"prompt": INSTRUCTION, "response": RESPONSE},  # --socialalign adds the system turn
    {"system": "你是一个微博用户。", "prompt": INSTRUCTION, "response": RESPONSE},  # its own system turn
    # A free-form prompt without the markers: the record gives the spans as character offsets.
    {"prompt": FREE_PROMPT, "response": RESPONSE, "user_end_char": FREE_PROMPT.index("新闻"),
     "news_end_char": FREE_PROMPT.index("请写")},
]


@pytest.fixture(scope="module")
def scored(setup, tmp_path_factory):
    """One CLI run over RECORDS (one compile), as a user would run it."""
    return _score(setup, tmp_path_factory.mktemp("scored"), RECORDS, "--socialalign")


def test_socialalign_prompt_routes_by_the_markers(setup, scored):
    rendered = authors_chat(INSTRUCTION)  # system turn 你是一个微博用户。 + the authors' instruction
    ref, spans = reference(setup, rendered, RESPONSE + "<|im_end|>")
    assert 0 < spans[0] < spans[1]
    unrouted, _ = reference(setup, rendered, RESPONSE + "<|im_end|>", spans=(0, 0))
    assert np.abs(unrouted - ref).max() > 1e-3  # the spans matter: a scorer ignoring them fails here
    for got in scored[:2]:
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)


def test_explicit_character_spans(setup, scored):
    u, n = RECORDS[2]["user_end_char"], RECORDS[2]["news_end_char"]
    rendered = f"<|im_start|>system\n你是一个微博用户。<|im_end|>\n<|im_start|>user\n{FREE_PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    _, _, hf_tok, _, _ = setup
    enc = hf_tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
    base = rendered.index(FREE_PROMPT)
    tok_at = lambda c: next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a <= c < b)  # noqa: E731
    ref, _ = reference(setup, rendered, RESPONSE + "<|im_end|>", spans=(tok_at(base + u), tok_at(base + n)))
    np.testing.assert_allclose(scored[2], ref, rtol=0, atol=1e-4)


def test_no_spans_is_one_line_error_unless_uniform(setup, tmp_path, capsys):
    _, _, _, ck, adapter = setup
    rec = {"prompt": "请写一条关于猫的微博：", "response": RESPONSE}
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "o.jsonl"
    with pytest.raises(SystemExit) as e:
        score_cli.cli_main(score_cli.main, ["--weights", str(ck), "--input", str(inp), "--out", str(out),
                                            "--adapters", str(adapter), "--socialalign"])
    assert e.value.code == 2 and not out.exists()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "in.jsonl: line 1" in lines[0] and "--routing uniform" in lines[0], lines
    # --routing uniform: both gates 1/E (the original's 'avg_both'), no spans needed. With the
    # reference's spans empty every gate input is 0, so its softmax is exactly 1/E too.
    rendered = f"<|im_start|>system\n你是一个微博用户。<|im_end|>\n<|im_start|>user\n{rec['prompt']}<|im_end|>\n<|im_start|>assistant\n"
    ref, _ = reference(setup, rendered, RESPONSE + "<|im_end|>", spans=(0, 0))
    got, = _score(setup, tmp_path, [rec], "--socialalign", "--routing", "uniform")
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
