"""core.buckets.bucket, the one rounding of lengths and row counts up to a shape bucket."""

import numpy as np
import pytest

from socialalign_jax.core.buckets import bucket
from socialalign_jax.data import pipeline as P


@pytest.mark.parametrize("n, step, want", [
    (0, 64, 64), (1, 64, 64), (64, 64, 64), (65, 64, 128), (200, 64, 256),  # scoring (step 64)
    (0, 32, 32), (31, 32, 32), (32, 32, 32), (33, 32, 64), (97, 32, 128),    # generation, features, personas
    (5, 1, 5), (7, 4, 8), (8, 4, 8),                                          # eval batch rows over devices
])
def test_multiple(n, step, want):
    assert bucket(n, multiple=step) == want


@pytest.mark.parametrize("n, want", [(0, 1), (1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8), (9, 16), (1000, 1024)])
def test_power_of_two(n, want):
    assert bucket(n, pow2=True) == want


def test_given_sizes_in_any_order():
    sizes = (256, 128, 320)
    assert [bucket(n, sizes=sizes) for n in (0, 100, 128, 129, 256, 257, 320)] == [128, 128, 128, 256, 256, 320, 320]
    with pytest.raises(ValueError, match="length 321 exceeds the largest bucket 320"):
        bucket(321, sizes=sizes)


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one of"), ({"multiple": 32, "pow2": True}, "exactly one of"),
    ({"multiple": 0}, "multiple must be >= 1"), ({"sizes": ()}, "sizes= is empty"),
])
def test_bad_policy_is_one_line_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bucket(3, **kwargs)


def test_negative_length_is_an_error():
    with pytest.raises(ValueError, match="length must be >= 0, got -1"):
        bucket(-1, multiple=8)


def test_pipeline_policy_keeps_seq_len_as_the_last_bucket():
    """The training pipeline's shapes: smallest bucket >= the longest row, seq_len past the buckets,
    and seq_len also for a row longer than it (so pad_rows names the example in its error)."""
    cfg = P.BatchConfig(events_per_batch=1, cases_per_event=1, seq_len=16, pad_id=0, buckets=(9, 6, 12))
    got = [P._bucket(np.array(lengths), cfg) for lengths in ([], [3], [6], [7, 2], [12], [13], [16], [40])]
    assert got == [6, 6, 6, 9, 12, 16, 16, 16]
    assert P._bucket(np.array([40]), P.BatchConfig(1, 1, seq_len=16, pad_id=0)) == 16  # no buckets: always S
