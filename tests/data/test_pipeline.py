"""Event-grouped pipeline: grouping, resumability, multi-host sharding, eval coverage.

References are independent re-derivations: a from-scratch reading of the plan (which
event each slot holds, which examples an epoch covers) and hand-built examples whose
token content encodes their own index, so any mix-up shows in the values.
"""

import json
import math

import numpy as np
import pytest

from socialalign_jax.data import pipeline as P
from socialalign_jax.data import targets as T

PAD = 7


def make_examples(sizes, seed=0, K=3):
    """Event e gets sizes[e] examples; example i's tokens are [100+i]*len, len varies."""
    rng = np.random.default_rng(seed)
    exs = []
    ev = np.repeat(np.arange(len(sizes)), sizes)
    ev = ev[rng.permutation(ev.size)]  # events interleaved in storage, as after a real build
    for i, e in enumerate(ev):
        n = int(rng.integers(3, 12))
        pl = int(rng.integers(1, n))
        exs.append({
            "input_ids": np.full(n, 100 + i, np.int32),
            "loss_mask": (np.arange(n) >= pl).astype(np.int32),
            "user_end": 1, "news_end": min(2, pl), "prompt_len": pl,
            "label": int(rng.integers(-1, K)), "event_id": int(e),
            "target_dist": np.eye(K, dtype=np.float32)[e % K],
            "event": f"ev{e}".encode(), "user": f"u{i}".encode(),
        })
    return exs


def row_index(batch):
    """Recover each row's example index from its tokens (-1 for padding rows)."""
    ids = batch["input_ids"][:, 0]
    return np.where(batch["example_mask"] > 0, ids - 100, -1)


def cfg(**kw):
    base = dict(events_per_batch=3, cases_per_event=4, seq_len=16, pad_id=PAD, seed=5,
                read_threads=2, prefetch=2)
    base.update(kw)
    return P.BatchConfig(**base)


SIZES = [9, 4, 1, 13, 6, 2, 7]


def test_every_batch_is_G_events_by_M_cases_and_an_epoch_covers_each_example_once():
    exs = make_examples(SIZES)
    c = cfg(num_epochs=1)
    batches = list(P.TrainIterator(exs, c, process_index=0, process_count=1))
    seen = []
    for b in batches:
        assert b["input_ids"].shape == (12, 16) and b["input_ids"].dtype == np.int32
        assert b["example_mask"].dtype == np.float32 and b["target_dist"].shape == (12, 3)
        assert set(b) == set(P.BATCH_DTYPES)
        slot_events = []
        for g in range(3):
            rows = b["event_id"][g * 4:(g + 1) * 4]
            real = rows[rows >= 0]
            assert len(set(real.tolist())) <= 1, f"slot {g} mixes events {rows}"
            # padding sits only at the end of a slot
            mask = b["example_mask"][g * 4:(g + 1) * 4]
            assert np.all(np.diff(mask) <= 0)
            if real.size:
                slot_events.append(int(real[0]))
        assert len(slot_events) == len(set(slot_events)), "an event occupies two slots"
        idx = row_index(b)
        for r, i in enumerate(idx):
            if i >= 0:  # the row is example i, with the fields of example i
                assert b["event_id"][r] == exs[i]["event_id"]
                assert b["label"][r] == exs[i]["label"]
                n = len(exs[i]["input_ids"])
                assert b["attention_mask"][r].sum() == n and np.all(b["input_ids"][r, n:] == PAD)
                np.testing.assert_array_equal(b["loss_mask"][r, :n], exs[i]["loss_mask"])
                np.testing.assert_array_equal(b["target_dist"][r], exs[i]["target_dist"])
            else:
                assert b["event_id"][r] == -1 and b["label"][r] == -1 and b["loss_mask"][r].sum() == 0
                assert b["attention_mask"][r].sum() == 1 and b["prompt_len"][r] == 1
        seen += [int(i) for i in idx if i >= 0]
    assert sorted(seen) == list(range(len(exs)))
    # Each event needs ceil(n/M) slots; the packing wastes no slot while >= G events remain.
    slots = sum(-(-n // 4) for n in SIZES)
    assert len(batches) >= -(-slots // 3)


def test_restored_iterator_yields_the_uninterrupted_batches():
    exs = make_examples(SIZES)
    c = cfg(num_epochs=3)
    ref = list(P.TrainIterator(exs, c, process_index=0, process_count=1))
    assert len(ref) > 6
    for cut in (0, 1, 4, len(ref) // 3 + 1, len(ref) - 1):
        it = P.TrainIterator(exs, c, process_index=0, process_count=1)
        head = [next(it) for _ in range(cut)]
        state = json.loads(json.dumps(it.get_state()))  # must survive JSON
        fresh = P.TrainIterator(exs, c, process_index=0, process_count=1)
        fresh.set_state(state)
        tail = list(fresh)
        assert len(head) + len(tail) == len(ref)
        for a, b in zip(head + tail, ref):
            for k in b:
                np.testing.assert_array_equal(a[k], b[k])


def test_epochs_reshuffle_but_are_reproducible_by_seed():
    ev = np.repeat(np.arange(5), [5, 6, 7, 3, 9])
    a0 = P.epoch_plan(ev, 2, 3, seed=1, epoch=0)
    assert np.array_equal(a0, P.epoch_plan(ev, 2, 3, seed=1, epoch=0))
    assert not np.array_equal(a0, P.epoch_plan(ev, 2, 3, seed=1, epoch=1))
    assert not np.array_equal(a0, P.epoch_plan(ev, 2, 3, seed=2, epoch=0))


def test_state_from_a_different_pipeline_is_refused():
    exs = make_examples(SIZES)
    it = P.TrainIterator(exs, cfg(), process_index=0, process_count=1)
    other = P.TrainIterator(exs, cfg(seed=6), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="seed"):
        other.set_state(it.get_state())


@pytest.mark.parametrize("n", [2, 4])
def test_processes_see_disjoint_shards_that_assemble_the_global_batch(n):
    exs = make_examples(SIZES)
    c = cfg(num_epochs=1, events_per_batch=2)  # B = 8
    ref = list(P.TrainIterator(exs, c, process_index=0, process_count=1))
    shards = [list(P.TrainIterator(exs, c, process_index=i, process_count=n)) for i in range(n)]
    for k, full in enumerate(ref):
        parts = [s[k] for s in shards]
        for key in full:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
        ids = [set(row_index(p)[row_index(p) >= 0].tolist()) for p in parts]
        for i in range(n):
            for j in range(i + 1, n):
                assert not ids[i] & ids[j]


def test_buckets_pick_the_same_length_on_every_host():
    exs = make_examples(SIZES)
    c = cfg(num_epochs=1, events_per_batch=2, buckets=(6, 9, 12))
    b0 = list(P.TrainIterator(exs, c, process_index=0, process_count=2))
    b1 = list(P.TrainIterator(exs, c, process_index=1, process_count=2))
    for x, y in zip(b0, b1):
        assert x["input_ids"].shape == y["input_ids"].shape
        longest = max(x["attention_mask"].sum(1).max(), y["attention_mask"].sum(1).max())
        want = min(b for b in (6, 9, 12, 16) if b >= longest)
        assert x["input_ids"].shape[1] == want


def test_too_long_example_is_an_error_not_a_truncation():
    exs = make_examples([3, 3])
    with pytest.raises(ValueError, match="tokens > seq_len 4"):
        P.TrainIterator(exs, cfg(seq_len=4), process_index=0, process_count=1)


def test_eval_batches_cover_every_example_in_order():
    exs = make_examples(SIZES)
    n = len(exs)
    got = []
    for b in P.eval_batches(exs, 8, 16, PAD, process_index=0, process_count=1):
        assert b["input_ids"].shape == (8, 16)
        got += row_index(b).tolist()
    assert got[:n] == list(range(n)) and all(g == -1 for g in got[n:]) and len(got) % 8 == 0
    halves = [list(P.eval_batches(exs, 8, 16, PAD, process_index=i, process_count=2)) for i in (0, 1)]
    merged = [np.concatenate([row_index(a), row_index(b)]) for a, b in zip(*halves)]
    assert np.concatenate(merged).tolist() == got


def test_macro_targets_match_hand_counts():
    # train: event 0 labels (neg, neg, pos, unlabelled), event 1 unlabelled only
    # test: event 0 (neutral) -> uses train dist; event 2 (pos, neutral) -> own, heldout
    tr = (np.array([0, 0, 0, 0, 1]), np.array([0, 0, 2, -1, -1]))
    te = (np.array([0, 2, 2]), np.array([1, 2, 1]))
    t = T.macro_targets({"train": tr, "test": te})
    floors = {s: {e: v.pop("noise_floor") for e, v in per.items()} for s, per in t.items()}
    assert t["train"][0] == {"dist": [2 / 3, 0.0, 1 / 3], "count": 3, "source": "train"}
    assert t["train"][1] == {"dist": [0.0, 0.0, 0.0], "count": 0, "source": "none"}
    assert t["test"][0]["dist"] == [2 / 3, 0.0, 1 / 3] and t["test"][0]["source"] == "train"
    assert t["test"][2] == {"dist": [0.0, 0.5, 0.5], "count": 2, "source": "heldout"}
    # noise floor of [0, 1/2, 1/2] from 2 responses, by hand: half the time both agree, JSD([0,.5,.5], [0,1,0])
    # = 1/2 (1/2 ln(.5/.75) + 1/2 ln(.5/.25)) + 1/2 ln(1/.75)
    both = 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)) + 0.5 * math.log(1 / 0.75)
    assert floors["test"][2] == pytest.approx(0.5 * both, rel=1e-12)
    assert floors["train"][1] is None and floors["test"][0] == floors["train"][0] > 0
    assert T.label_id("Positive") == 2 and T.label_id(None) == -1
    with pytest.raises(ValueError, match="unknown sentiment"):
        T.label_id("angry")
    j = T.from_json(json.loads(json.dumps(T.to_json(t, ["a", "b", "c"]))))
    assert j["test"][2]["event"] == "c" and j["test"][2]["dist"] == [0.0, 0.5, 0.5]
