"""build_dataset CLI: the summary it prints, and one-line errors with exit status 2.

The happy path runs the script as a subprocess (the real entry point); the summary's
numbers are checked against counts taken from the raw fixture files.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "build_dataset.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def write_events(d: Path, bad_case=None):
    d.mkdir(parents=True, exist_ok=True)
    labels = ["negative", "positive", None, "neutral", "negative"]
    for e in range(3):
        cases = []
        for c in range(e + 2):
            case = {"user_name": f"u{c}", "weibo": f"回复{e}-{c}",
                    "history": [{"text": f"旧微博{k}"} for k in range(5)]}
            if labels[c] is not None:
                case["sentiment"] = labels[c]
            cases.append(case)
        if bad_case and e == 1:
            cases[1].update(bad_case)
        (d / f"e{e}.json").write_text(json.dumps({"topic": "t", "news": f"新闻{e}", "cases": cases},
                                                 ensure_ascii=False), encoding="utf-8")


def test_summary_counts_match_the_input(tmp_path):
    write_events(tmp_path / "ev")
    r = run("--source", "socialweibo", "--input", tmp_path / "ev", "--out", tmp_path / "out",
            "--max_length", "256", "--test_fraction", "0.34", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    sp = s["splits"]
    assert sum(x["cases"] for x in sp.values()) == 2 + 3 + 4
    assert sp["train"]["events"] == 2 and sp["test"]["events"] == 1
    # labels of cases 0..n-1 per event: counted from the fixture definition above
    labels = ["negative", "positive", None, "neutral", "negative"]
    sizes = {0: 2, 1: 3, 2: 4}
    total = {k: 0 for k in ("unlabelled", "negative", "neutral", "positive")}
    for n in sizes.values():
        for c in range(n):
            total[labels[c] or "unlabelled"] += 1
    got = {k: sum(x["labels"][k] for x in sp.values()) for k in total}
    assert got == total
    for x in sp.values():
        assert x["p50"] <= x["p90"] <= x["p99"] <= x["max"] <= 256
    assert s["stats"]["skipped_too_long"] == 0 and s["stats"]["built"] == 9
    # the table form prints the same numbers
    r2 = run("--source", "socialweibo", "--input", tmp_path / "ev", "--out", tmp_path / "out",
             "--overwrite", "--max_length", "256", "--test_fraction", "0.34")
    assert r2.returncode == 0 and "read 9 cases, built 9" in r2.stdout and "p99" in r2.stdout


def one_error_line(capsys, argv):
    sys.path.insert(0, str(SCRIPT.parent))
    import build_dataset

    from socialalign_jax.core.errors import cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(build_dataset.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_missing_input_dir(tmp_path, capsys):
    line = one_error_line(capsys, ["--source", "socialweibo", "--input", str(tmp_path / "nope"),
                                   "--out", str(tmp_path / "o")])
    assert str(tmp_path / "nope") in line


def test_malformed_json_names_the_file(tmp_path, capsys):
    write_events(tmp_path / "ev")
    (tmp_path / "ev" / "e2.json").write_text('{"topic": "t", "news": }', encoding="utf-8")
    line = one_error_line(capsys, ["--source", "socialweibo", "--input", str(tmp_path / "ev"),
                                   "--out", str(tmp_path / "o")])
    assert "e2.json" in line and "malformed JSON" in line
    (tmp_path / "ev" / "e2.json").write_text('{"topic": "t", "news": ', encoding="utf-8")  # an interrupted copy
    line = one_error_line(capsys, ["--source", "socialweibo", "--input", str(tmp_path / "ev"),
                                   "--out", str(tmp_path / "o")])
    assert "e2.json: the file ends in the middle of a JSON value" in line and "cut short" in line


def test_bad_field_names_file_record_and_field(tmp_path, capsys):
    write_events(tmp_path / "ev", bad_case={"sentiment": "furious"})
    line = one_error_line(capsys, ["--source", "socialweibo", "--input", str(tmp_path / "ev"),
                                   "--out", str(tmp_path / "o")])
    assert "e1.json" in line and "record 1" in line and "'sentiment'" in line


def test_too_long_with_raise_names_the_record(tmp_path, capsys):
    write_events(tmp_path / "ev")
    line = one_error_line(capsys, ["--source", "socialweibo", "--input", str(tmp_path / "ev"),
                                   "--out", str(tmp_path / "o"), "--max_length", "40", "--on_overflow", "raise"])
    assert "e0.json" in line and "record 0" in line and "max_length 40" in line


def test_bad_alpaca_and_lamp_inputs(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "hi", "input": "", "output": "x"}]))
    line = one_error_line(capsys, ["--source", "alpaca", "--input", str(tmp_path / "a.json"),
                                   "--out", str(tmp_path / "o")])
    assert "a.json" in line and "record 0" in line and "'instruction'" in line
    (tmp_path / "lamp").mkdir()
    line = one_error_line(capsys, ["--source", "lamp", "--input", str(tmp_path / "lamp"),
                                   "--out", str(tmp_path / "o2")])
    assert "lamp" in line and "questions" in line


@pytest.mark.parametrize("spec", ["configs/weibo.py", "configs/weibo.py:7b", "configs/weibo.py:smollm2"])
def test_defaults_are_the_configs_data_section(spec):
    """The dataset build_dataset makes by default is the one train.py would build from the same config."""
    import importlib.util

    sys.path.insert(0, str(SCRIPT.parent))
    import build_dataset

    mod_spec = importlib.util.spec_from_file_location("weibo_ref", ROOT / "configs" / "weibo.py")
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    path, _, preset = spec.partition(":")
    data = (mod.get_config(preset) if preset else mod.get_config()).data
    args = build_dataset.parse_args(["--source", "socialweibo", "--input", "x", "--out", "y"]
                                    + (["--config", spec] if preset else []))
    for key in build_dataset.CONFIG_DEFAULTS:
        assert getattr(args, key) == data[key], key
    if preset == "7b":  # --config is read, not only the default file: the preset's own length
        assert args.max_length == data.max_length != mod.get_config().data.max_length


@pytest.mark.parametrize("name", ["../../../x", "a/b", "..", " padded"])
def test_a_name_that_would_leave_out_is_refused(tmp_path, capsys, name):
    """--name becomes a directory below --out: a path out of it (or into a subtree) is one line, nothing written."""
    write_events(tmp_path / "ev")
    out = tmp_path / "deep" / "er" / "out"
    line = one_error_line(capsys, ["--source", "socialweibo", "--input", str(tmp_path / "ev"),
                                   "--out", str(out), f"--name={name}"])
    assert line.startswith("error: --name: ") and repr(name) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev"]  # nothing inside or outside --out


@pytest.mark.parametrize("source, labels, fixed, missing", [
    ("ced", "a,b", "negative,neutral,positive", "negative,neutral,positive"),
    ("zs_csd", "negative,neutral,positive", "favor,against,neutral", "favor,against")])
def test_labels_a_converter_does_not_give_name_the_flag(tmp_path, capsys, source, labels, fixed, missing):
    """A converter labels its cases itself: names it never gives are the flag's fault, said before reading."""
    (tmp_path / "in").mkdir()  # never read: the flag is checked first
    line = one_error_line(capsys, ["--source", source, "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                                   f"--labels={labels}"])
    assert line == (f"error: --labels '{labels}': source '{source}' labels its cases {fixed}, so the classes must "
                    f"include {missing} (in the order you want) or leave the setting out")
    assert not (tmp_path / "o").exists()


def test_train_names_data_labels_a_converter_does_not_give(tmp_path):
    from socialalign_jax.core.errors import UserError
    from socialalign_jax.data import setup

    from tests.train_helpers import typed_config

    cfg = typed_config(**{"data.source": "ced", "data.input": str(tmp_path), "data.labels": "a,b,c"})
    with pytest.raises(UserError, match=r"^data\.labels 'a,b,c': source 'ced' labels its cases negative,neutral,"):
        setup.prepare(cfg, None, str(tmp_path / "w"))
