"""Persona extraction: the parser on hand-written answers, and the CLI on a tiny random model."""

import importlib.util
import json
from pathlib import Path

import pytest

from socialalign_jax.tools.personas import (MAX_ITEM_CHARS, PERSONA_ITEMS, UNKNOWN, parse_persona, persona_prompt)
from socialalign_jax.data.records import read_event_file

ROOT = Path(__file__).resolve().parents[2]


def _cli():
    spec = importlib.util.spec_from_file_location("build_personas_cli", ROOT / "launch" / "build_personas.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parse_well_formed():
    answer = "兴趣话题: 体育、跑步\n语言风格：口语化，爱用感叹号\n情感基调: 积极\n性格特点: 外向\n价值观: 重视家庭"
    p = parse_persona(answer)
    assert p.text == ("兴趣话题: 体育、跑步\n语言风格: 口语化，爱用感叹号\n情感基调: 积极\n性格特点: 外向\n"
                      "价值观: 重视家庭")
    assert p.missing == () and p.truncated == ()


def test_parse_markers_missing_and_overlong():
    long_value = "一二三四五六七八九十" * 3  # 30 characters
    answer = ("好的，以下是画像：\n"
              "1. **兴趣话题**：科技\n"
              "- 语言风格: \n"                   # empty -> unknown
              f"情感基调: {long_value}\n"
              "情感基调: 第二次出现被忽略\n"
              "其他: 不相关\n"
              "价值观：  务实   低调 ")
    p = parse_persona(answer)
    lines = p.text.split("\n")
    assert lines == ["兴趣话题: 科技", f"语言风格: {UNKNOWN}", f"情感基调: {long_value[:MAX_ITEM_CHARS]}",
                     f"性格特点: {UNKNOWN}", "价值观: 务实 低调"]
    assert p.missing == ("语言风格", "性格特点") and p.truncated == ("情感基调",)
    assert parse_persona("").text == "\n".join(f"{k}: {UNKNOWN}" for k in PERSONA_ITEMS)


def _case(name, n_history, persona=None):
    c = {"user_name": name, "weibo": f"{name}的评论", "sentiment": "neutral",
         "history": [{"text": f"{name}的第{j}条微博"} for j in range(n_history)]}
    if n_history:
        c["history"][0]["retweet"] = {"text": "原微博"}
    if persona is not None:
        c["user_persona"] = persona
    return c


def _fixture(d: Path):
    d.mkdir()
    ev0 = {"topic": "话题A", "news": "新闻A", "cases": [_case("甲", 3), _case("乙", 2, persona="已有画像")],
           "extra_field": 1}
    ev1 = {"topic": "话题B", "news": "新闻B", "cases": [_case("丙", 1), _case("丁", 0)]}
    for name, ev in (("a.json", ev0), ("b.json", ev1)):
        (d / name).write_text(json.dumps(ev, ensure_ascii=False), encoding="utf-8")
    return ev0, ev1


@pytest.fixture(scope="module")
def weights():
    from socialalign_jax.weights.resolve import resolve_weights

    return resolve_weights("random:tiny-qwen2")


def test_prompt_lists_history():
    from socialalign_jax.data.records import Case, HistoryPost

    case = Case("甲", "x", [HistoryPost("第一条", retweet="原文"), HistoryPost("第二条"), HistoryPost("第三条")])
    p = persona_prompt(case, max_history=2)
    assert "“甲”" in p and "1. 你转发了微博: 原文, 并评论说: 第一条\n2. 第二条\n" in p and "第三条" not in p
    assert all(f"{k}: " in p for k in PERSONA_ITEMS) and "20个字" in p


def test_cli_end_to_end(tmp_path, weights, monkeypatch, capsys):
    from socialalign_jax.weights import resolve

    ev0, ev1 = _fixture(tmp_path / "in")
    monkeypatch.setattr(resolve, "resolve_weights", lambda spec, dtype=None: weights)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        _cli().main(["--weights", "random:tiny-qwen2", "--input", str(tmp_path / "in"), "--out", str(out),
                     "--max_new_tokens", "4", "--greedy", "--batch_size", "2", "--noprogress"])
    assert e.value.code == 0
    summary = capsys.readouterr().out
    assert "2 event files, 4 cases: 2 personas generated, 1 existing kept, 1 without history" in summary
    events = [read_event_file(out / n, allow_short_history=True) for n in ("a.json", "b.json")]
    cases = [c for ev in events for c in ev.cases]
    assert cases[1].persona == "已有画像"
    for c in (cases[0], cases[2], cases[3]):
        lines = c.persona.split("\n")
        assert len(lines) == 5 and [l.split(": ")[0] for l in lines] == list(PERSONA_ITEMS)
        assert all(0 < len(l.split(": ", 1)[1]) <= MAX_ITEM_CHARS for l in lines)
    assert cases[3].persona == parse_persona("").text  # no history: all unknown, no model call
    # Everything else is written back unchanged.
    raw0 = json.loads((out / "a.json").read_text(encoding="utf-8"))
    assert raw0["extra_field"] == 1 and raw0["cases"][0]["history"] == ev0["cases"][0]["history"]
    assert [c.weibo for c in cases] == [c["weibo"] for c in ev0["cases"] + ev1["cases"]]
    # --overwrite_existing regenerates the kept one too.
    from socialalign_jax.tools.personas import build_personas
    from socialalign_jax.model.sampling import SamplingConfig

    scfg = SamplingConfig(max_new_tokens=4, greedy=True, stop_tokens=(151645, 151643), pad_id=151643)
    s = build_personas(weights.params, weights.cfg, weights.tokenizer, tmp_path / "in", tmp_path / "out2",
                       scfg=scfg, batch_size=2, overwrite_existing=True, progress=False)
    assert (s.generated, s.kept, s.no_history) == (3, 0, 1)
    assert read_event_file(tmp_path / "out2" / "a.json", allow_short_history=True).cases[1].persona.count("\n") == 4


def test_cli_bad_input_is_one_line(tmp_path, weights, monkeypatch, capsys):
    from socialalign_jax.weights import resolve

    _fixture(tmp_path / "in")
    bad = json.loads((tmp_path / "in" / "b.json").read_text(encoding="utf-8"))
    del bad["cases"][1]["user_name"]
    (tmp_path / "in" / "b.json").write_text(json.dumps(bad, ensure_ascii=False), encoding="utf-8")
    monkeypatch.setattr(resolve, "resolve_weights", lambda spec, dtype=None: weights)
    with pytest.raises(SystemExit) as e:
        _cli().main(["--weights", "random:tiny-qwen2", "--input", str(tmp_path / "in"), "--out",
                     str(tmp_path / "out"), "--noprogress"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert "b.json: record 1: field 'user_name': missing" in err
    assert not (tmp_path / "out").exists()  # nothing written on bad input


def test_cli_missing_input_is_refused_before_the_weights_load(tmp_path, monkeypatch, capsys):
    from socialalign_jax.weights import resolve

    def never(*a, **k):
        raise AssertionError("the weights were loaded before --input was checked")

    monkeypatch.setattr(resolve, "resolve_weights", never)
    with pytest.raises(SystemExit) as e:
        _cli().main(["--weights", "gguf:smollm2", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and f"--input {tmp_path / 'nope'}: not a directory" in err
