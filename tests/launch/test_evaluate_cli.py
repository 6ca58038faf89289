"""launch/evaluate.py end to end on a small predictions file, and its one-line input errors."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from socialalign_jax.core.labels import DEFAULT_LABELS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "evaluate.py"
LABELS = list(DEFAULT_LABELS)
POS = "这部电影太好看了，我非常喜欢！"
NEG = "太糟糕了，我很生气，真是垃圾。"


def _load_cli():
    spec = importlib.util.spec_from_file_location("evaluate_cli", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cli = _load_cli()


def rec(event_id, event, text, label, probs, **extra):
    r = {"event": event, "event_id": event_id, "user": f"u{event_id}", "prompt_id": 1, "generated": text,
         "reference": text, "label": label, "probs": probs, "labels": LABELS}
    r.update(extra)
    return r


def records():
    return [
        # event 0: real distribution from its labels (1 negative, 1 positive); head mean [0.4, 0.2, 0.4]
        rec(0, "事件A", POS, "negative", [0.6, 0.2, 0.2], ref_logprob_sum=-2.0, ref_num_tokens=1),
        rec(0, "事件A", POS, "positive", [0.2, 0.2, 0.6], ref_logprob_sum=-4.0, ref_num_tokens=3),
        # event 7: target_dist given on one line only; head equals it; one wrong head prediction
        rec(7, "事件B", NEG, None, [0.2, 0.3, 0.5], target_dist=[0.2, 0.3, 0.5]),
        rec(7, "事件B", NEG, "neutral", [0.2, 0.3, 0.5]),
        rec(7, "事件B", NEG, None, [0.2, 0.3, 0.5]),
        # event 9: no label, no target: reported, not scored
        rec(9, "event C", "他去了上海。", None, [1 / 3, 1 / 3, 1 / 3]),
    ]


def write_jsonl(path, recs, extra_lines=()):
    lines = [json.dumps(r, ensure_ascii=False) for r in recs] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_end_to_end(tmp_path):
    preds = write_jsonl(tmp_path / "p.jsonl", records())
    gates = {"modules": ["q", "v"], "segments": ["user", "news", "other"], "layers": 2,
             "gate_a": np.full((2, 2, 3, 3), 1 / 3).tolist(), "gate_b": np.full((2, 2, 3, 2), 0.5).tolist()}
    (tmp_path / "g.json").write_text(json.dumps(gates))
    (tmp_path / "base.json").write_text(json.dumps({"micro": {"bleu": 90.0}}))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--predictions", str(preds), "--out", str(out),
                           "--gates", str(tmp_path / "g.json"), "--baseline", str(tmp_path / "base.json"),
                           "--labeller", "none"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    mi, ma = m["micro"], m["macro"]
    assert (mi["rouge1"], mi["rouge2"], mi["rougeL"]) == (1.0, 1.0, 1.0)  # generated == reference
    assert mi["bleu"] == pytest.approx(100.0)
    # head predictions: negative, positive | positive(x3) | neutral; gold on lines 1, 2, 4.
    assert mi["sentiment_accuracy"] == pytest.approx(2 / 3)
    # negative F1 1, positive TP1 FP1 -> 2/3, neutral 0
    assert mi["sentiment_macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert mi["perplexity"] == pytest.approx(math.exp(6 / 4))
    j0 = jensenshannon([0.5, 0, 0.5], [0.4, 0.2, 0.4]) ** 2
    assert ma["head"]["num_events"] == 2
    assert ma["head"]["jsd_mean"] == pytest.approx(j0 / 2)
    assert ma["head"]["jsd_weighted"] == pytest.approx(2 * j0 / 5)
    assert ma["head"]["tv_mean"] == pytest.approx(0.5 * (0.1 + 0.2 + 0.1) / 2)
    assert "generated" not in ma and m["labeller"] == "none"
    ev = {e["event_id"]: e for e in m["per_event"]}
    assert ev[7]["real"] == [0.2, 0.3, 0.5] and ev[7]["real_source"] == "target_dist"
    assert ev[0]["real_source"] == "labels" and ev[9]["real"] is None
    assert any("event_id [9]" in n for n in m["notes"])
    for name in ("distributions.png", "gate_a_max.png", "gate_b_max.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "metrics.md").read_text(encoding="utf-8")
    assert "| micro.bleu | 100.0000 | 90.0000 | +10.0000 |" in proc.stdout
    assert "| micro.bleu | 100.0000 | 90.0000 | +10.0000 |" in md and "事件B" in md


def test_generated_posts_macro_with_lexicon(tmp_path):
    # In-process (snownlp takes seconds to import; the suite pays that once).
    pytest.importorskip("snownlp")
    from socialalign_jax.data.labellers import LexiconLabeller

    m = cli.evaluate(cli.load_predictions(str(write_jsonl(tmp_path / "p.jsonl", records()))), LexiconLabeller())
    # the lexicon labels every POS line positive and every NEG line negative
    ev = {e["event_id"]: e for e in m["per_event"]}
    assert ev[0]["generated"] == [0, 0, 1] and ev[7]["generated"] == [1, 0, 0]
    g0 = jensenshannon([0.5, 0, 0.5], [0, 0, 1]) ** 2
    g7 = jensenshannon([0.2, 0.3, 0.5], [1, 0, 0]) ** 2
    assert m["macro"]["generated"]["jsd_weighted"] == pytest.approx((2 * g0 + 3 * g7) / 5)
    assert m["macro"]["generated"]["tv_mean"] == pytest.approx((0.5 + 0.8) / 2)
    assert m["labeller"] == "lexicon"


def _error(tmp_path, capsys, recs=None, extra_lines=(), args=()):
    preds = write_jsonl(tmp_path / "p.jsonl", records() if recs is None else recs, extra_lines)
    rc = cli.main(["--predictions", str(preds), "--out", str(tmp_path / "o"), "--labeller", "none", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    return err


@pytest.mark.parametrize("mutate, expect", [
    (lambda r: r[2].update(probs=[0.5, 0.5]), "p.jsonl: line 3: field 'probs'"),
    (lambda r: r[1].update(probs=[0.5, 0.5, 0.5]), "p.jsonl: line 2: field 'probs'"),
    (lambda r: r[0].update(label="angry"), "p.jsonl: line 1: field 'label'"),
    (lambda r: r[3].pop("generated"), "p.jsonl: line 4: field 'generated': missing"),
    (lambda r: r[4].update(event_id="7"), "p.jsonl: line 5: field 'event_id'"),
    (lambda r: r[4].update(labels=["neg", "neu", "pos"]), "p.jsonl: line 5: field 'labels'"),
    (lambda r: r[1].pop("ref_num_tokens"), "p.jsonl: line 2: field 'ref_num_tokens': missing"),
    (lambda r: r[4].update(target_dist=[0.5, 0.3, 0.2]), "p.jsonl: line 5: field 'target_dist'"),
    (lambda r: r[5].update(event="事件A", event_id=0, user="x") or r[5].update(event="other name"),
     "p.jsonl: line 6: field 'event'"),
])
def test_bad_records(tmp_path, capsys, mutate, expect):
    recs = records()
    mutate(recs)
    assert _error(tmp_path, capsys, recs).startswith("error: " + str(tmp_path / expect))


def test_bad_json_line_and_files(tmp_path, capsys):
    err = _error(tmp_path, capsys, extra_lines=['{"event": "x", '])
    assert err.startswith(f"error: {tmp_path / 'p.jsonl'}: line 7: invalid JSON")
    err = _error(tmp_path, capsys, recs=[], extra_lines=["[1, 2]"])
    assert err == f"error: {tmp_path / 'p.jsonl'}: line 1: expected a JSON object, got list"
    assert _error(tmp_path, capsys, recs=[], extra_lines=["  "]) == f"error: {tmp_path / 'p.jsonl'}: no records"
    bad_gates = {"modules": ["q"], "segments": ["user", "news", "other"], "layers": 2,
                 "gate_a": np.full((2, 2, 3, 3), 1 / 3).tolist(), "gate_b": np.full((2, 1, 3, 2), 0.5).tolist()}
    (tmp_path / "g.json").write_text(json.dumps(bad_gates))
    err = _error(tmp_path, capsys, args=["--gates", str(tmp_path / "g.json")])
    assert err.startswith(f"error: {tmp_path / 'g.json'}: field 'gate_a': expected shape [2, 1, 3, E]")
    err = _error(tmp_path, capsys, args=["--baseline", str(tmp_path / "nope.json")])
    assert err.startswith(f"error: {tmp_path / 'nope.json'}: cannot read baseline")


def test_malformed_line_subprocess_has_no_traceback(tmp_path):
    preds = write_jsonl(tmp_path / "p.jsonl", records()[:2], extra_lines=["not json"])
    proc = subprocess.run([sys.executable, str(SCRIPT), "--predictions", str(preds), "--out",
                           str(tmp_path / "o"), "--labeller", "none"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {preds}: line 3: invalid JSON (Expecting value at column 1)"
    assert not (tmp_path / "o").exists()
