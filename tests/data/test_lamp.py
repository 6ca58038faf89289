"""LaMP readers, profile retrieval, prompt spans and the lamp builder.

Fixtures are written here in the published LaMP format (questions list + outputs
{task, golds}). Span checks decode the stored token ranges and compare with the texts
the template puts there; retrieval is checked on a profile where one item shares the
input's rare words and the others share none.
"""

import json

import numpy as np
import pytest

from socialalign_jax.data import lamp, tfds_builders as B
from socialalign_jax.data.prompt import PromptConfig, PromptTooLong
from socialalign_jax.data.records import DataError
from socialalign_jax.weights.tokenizer import IM_END, load_tokenizer

PREFIX = lamp.INPUT_PREFIXES["LaMP-4"]


def questions():
    return [
        {"id": "310", "input": PREFIX + "Volcano erupts near Reykjavik, flights cancelled.",
         "profile": [{"id": "1", "title": "Stocks rally", "text": "markets rose on friday"},
                     {"id": "2", "title": "Lava flows again", "text": "volcano eruption reykjavik iceland flights"},
                     {"id": "3", "title": "Cup final", "text": "the team won the cup"}]},
        {"id": "311", "input": PREFIX + "New park opens downtown.",
         "profile": [{"id": "4", "title": "Green city", "text": "a park opens downtown"}]},
    ]


def outputs():
    return {"task": "LaMP_4", "golds": [{"id": "311", "output": "Downtown gets a park"},
                                         {"id": "310", "output": "Iceland volcano grounds flights"}]}


def write(tmp_path, q=None, o=None):
    qp, op = tmp_path / "dev_questions.json", tmp_path / "dev_outputs.json"
    qp.write_text(json.dumps(questions() if q is None else q))
    op.write_text(json.dumps(outputs() if o is None else o))
    return qp, op


def test_read_lamp_joins_golds_by_id(tmp_path):
    qp, op = write(tmp_path)
    task, qs = lamp.read_lamp(qp, op)
    assert task == "LaMP-4" and [q.id for q in qs] == ["310", "311"]
    assert qs[0].output == "Iceland volcano grounds flights" and qs[1].output == "Downtown gets a park"
    assert len(qs[0].profile) == 3 and qs[0].index == 0
    task, qs = lamp.read_lamp(qp, None, task="lamp_4")  # no golds: outputs stay None
    assert qs[0].output is None


@pytest.mark.parametrize("mutate, match", [
    (lambda q, o: o["golds"].pop(0), "no gold output for question id '311'"),
    (lambda q, o: o["golds"].append({"id": "999", "output": "x"}), "gold ids have no question"),
    (lambda q, o: q[0]["profile"][1].pop("title"), r"record 0: field 'profile\[1\].title': missing"),
    (lambda q, o: q[1].__setitem__("input", 5), "record 1: field 'input': expected a string"),
    (lambda q, o: q[1].__setitem__("id", "310"), "record 1: field 'id': duplicate id"),
    (lambda q, o: o.__setitem__("task", "LaMP_9"), "unsupported LaMP task"),
])
def test_bad_files_name_the_record_and_field(tmp_path, mutate, match):
    q, o = questions(), outputs()
    mutate(q, o)
    qp, op = write(tmp_path, q, o)
    with pytest.raises((DataError, ValueError), match=match):
        lamp.read_lamp(qp, op)


def test_malformed_json_names_the_file(tmp_path):
    qp, op = write(tmp_path)
    qp.write_text('[{"id": "1",, "input": "x"}]')
    with pytest.raises(DataError, match="dev_questions.json: malformed JSON"):
        lamp.read_lamp(qp, op)


def test_task_mismatch_is_an_error(tmp_path):
    qp, op = write(tmp_path)
    with pytest.raises(DataError, match="does not match"):
        lamp.read_lamp(qp, op, task="LaMP-7")


def test_retrieval_puts_the_matching_item_first_and_ignores_the_task_prefix():
    q = lamp.LampQuestion("310", questions()[0]["input"], tuple(questions()[0]["profile"]), None, 0)
    top = lamp.select_profile(q, "LaMP-4", 2)
    assert len(top) == 2 and top[0] == '"Lava flows again" is the title for "volcano eruption reykjavik iceland flights"'
    assert lamp.retrieval_query(q.input, "LaMP-4") == "Volcano erupts near Reykjavik, flights cancelled."
    assert lamp.render_item({"title": "T", "abstract": "A"}, "LaMP-5") == '"T" is the title for "A"'
    assert lamp.render_item({"text": "hi"}, "LaMP-7") == '"hi"'


def test_example_spans_decode_to_profile_input_and_response(tmp_path):
    tok = load_tokenizer()
    qp, op = write(tmp_path)
    _, qs = lamp.read_lamp(qp, op)
    ex = lamp.build_lamp_example(qs[0], "LaMP-4", tok, PromptConfig(max_length=256, num_history=2))
    ids = ex["input_ids"]
    user = tok.decode(ids[:ex["user_end"]])
    news = tok.decode(ids[ex["user_end"]:ex["news_end"]])
    assert user.endswith("1. " + lamp.select_profile(qs[0], "LaMP-4", 2)[0] + "\n2. "
                         + lamp.select_profile(qs[0], "LaMP-4", 2)[1] + "\n")
    assert news == lamp.TASK_MARKER + qs[0].input
    assert tok.decode(ids[ex["news_end"]:ex["prompt_len"]]) == f"{IM_END}\n<|im_start|>assistant\n"
    resp = ids[ex["loss_mask"] == 1]
    assert tok.decode(resp) == qs[0].output + IM_END and ex["prompt_len"] + len(resp) == len(ids)
    assert ex["n_truncated_history_chars"] == 0


def test_overflow_drops_lowest_ranked_items_then_skips_or_raises(tmp_path):
    tok = load_tokenizer()
    qp, op = write(tmp_path)
    _, qs = lamp.read_lamp(qp, op)
    full = lamp.build_lamp_example(qs[0], "LaMP-4", tok, PromptConfig(max_length=512, num_history=3))
    items = lamp.select_profile(qs[0], "LaMP-4", 3)
    # room for everything but the last item: exactly that one is dropped
    short = lamp.build_lamp_example(qs[0], "LaMP-4", tok,
                                    PromptConfig(max_length=len(full["input_ids"]) - 3, num_history=3))
    assert short["n_truncated_history_chars"] == len(items[2])
    assert items[1] in tok.decode(short["input_ids"]) and items[2] not in tok.decode(short["input_ids"])
    tiny = PromptConfig(max_length=30, num_history=3)
    assert lamp.build_lamp_example(qs[0], "LaMP-4", tok, tiny) is None
    with pytest.raises(PromptTooLong, match="dev_questions.json: record 0: field 'input'"):
        lamp.build_lamp_example(qs[0], "LaMP-4", tok, PromptConfig(max_length=30, on_overflow="raise"))


def test_lamp_builder_round_trip(tmp_path):
    write(tmp_path)
    cfg = B.SocialConfig(name="l4", source="lamp", input=str(tmp_path), max_length=256, test_fraction=0.0)
    ds = B.open_dataset(B.build(tmp_path / "out", cfg))
    assert list(ds.sources) == ["train"]
    tok = load_tokenizer()
    _, qs = lamp.read_lamp(tmp_path / "dev_questions.json", tmp_path / "dev_outputs.json")
    src = ds.source("train")
    assert len(src) == 2
    for i, q in enumerate(qs):
        ex = src[i]
        want = lamp.build_lamp_example(q, "LaMP-4", tok, PromptConfig(max_length=256))
        np.testing.assert_array_equal(ex["input_ids"], want["input_ids"])
        assert ex["event"].decode() == q.id and ex["response"].decode() == q.output
        assert int(ex["label"]) == -1 and int(ex["event_id"]) == i
        assert (int(ex["user_end"]), int(ex["news_end"])) == (want["user_end"], want["news_end"])
