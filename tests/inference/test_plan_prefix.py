"""generation.plan_prefix: where a call of users under several wordings cuts its prompts into a shared
prefix and continuations, checked against slot counts made by padding real arrays and by hand."""

from __future__ import annotations

import numpy as np
import pytest

from socialalign_jax.inference.generation import plan_prefix
from socialalign_jax.model.sampling import left_pad


def _slots(heads, lengths, p0, multiple):
    """Prompt slots one call prefills when group g shares its first min(heads[g], p0) tokens, counted on
    padded arrays as sample_rows builds them (no prefix at p0 = 0)."""
    rng = np.random.default_rng(0)
    prefixes, rests = [], []
    for h, ns in zip(heads, lengths):
        head = rng.integers(1, 50, h)
        cut = min(h, p0)
        prefixes.append(head[:cut])
        rests += [np.concatenate([head, rng.integers(1, 50, n - h)])[cut:] for n in ns]
    rest_len = -(-max(len(r) for r in rests) // multiple) * multiple
    total = left_pad(rests, 0, rest_len)[0].size
    if p0:
        total += left_pad(prefixes, 0, p0, allow_empty=True)[0].size
    return total


def test_the_papers_budget_cuts_every_prompt_below_its_head():
    """The authors' template at 1024 tokens, 8 users x 2 wordings (heads 275-295 of 580-600 tokens): sharing
    each whole head prefills 8 x 320 + 16 x 352 = 8192 slots, cutting every prompt at 256 7680."""
    heads = [275, 280, 285, 290, 295, 276, 281, 294]
    lengths = [[590, 600]] * 4 + [[580, 585]] * 4
    assert _slots(heads, lengths, 320, 32) == 8192 and _slots(heads, lengths, 256, 32) == 7680
    assert plan_prefix(heads, lengths, 32) == (256, 352, [256] * 8)


def test_a_cut_between_the_heads_pads_the_shorter_ones():
    """The smollm2 preset's shapes (user spans 89-106 of 386-403 tokens): p0 = 96 shares 89-96 tokens per
    user (8 x 96 + 16 x 320 = 5888 slots) where each whole head takes 8 x 128 + 16 x 320 = 6144."""
    heads = [89, 95, 100, 106, 90, 91, 92, 93]
    lengths = [[396, 403]] * 4 + [[386, 390]] * 4
    p0, p_len, cut = plan_prefix(heads, lengths, 32)
    assert (p0, p_len, cut) == (96, 320, [89, 95, 96, 96, 90, 91, 92, 93])
    assert _slots(heads, lengths, 96, 32) == 5888 and _slots(heads, lengths, 128, 32) == 6144


@pytest.mark.parametrize("seed", range(40))
def test_the_plan_prefills_the_fewest_slots_of_any_cut(seed):
    """Random calls: the plan is a valid split (cuts within the heads and the prefix; every continuation
    fits p_len; multiples of the bucket) and no prefix length, a multiple of the bucket up to the longest
    head's, prefills fewer slots (counted on padded arrays); on a tie the longer prefix is kept."""
    rng = np.random.default_rng(seed)
    multiple = int(rng.choice([8, 32]))
    groups, r = int(rng.integers(1, 6)), int(rng.integers(1, 4))
    lengths = [sorted(int(n) for n in rng.integers(2, 200, r)) for _ in range(groups)]
    heads = [int(rng.integers(0, min(ns))) for ns in lengths]  # at least one token left for each prompt
    p0, p_len, cut = plan_prefix(heads, lengths, multiple)
    assert p0 % multiple == 0 and p_len % multiple == 0 and p_len >= multiple
    assert all(c == min(h, p0) for c, h in zip(cut, heads))
    assert max(n - c for c, ns in zip(cut, lengths) for n in ns) <= p_len
    if max(heads) == 0:
        assert p0 == 0
        return
    top = -(-max(heads) // multiple) * multiple
    counts = {q: _slots(heads, lengths, q, multiple) for q in range(0, top + 1, multiple)}
    got = counts[p0]
    assert got == min(counts.values()) and all(q <= p0 for q, n in counts.items() if n == got), counts


def test_one_prompt_per_group_shares_nothing():
    assert plan_prefix([0, 0, 0], [[10], [40], [33]], 32) == (0, 64, [0, 0, 0])
    with pytest.raises(ValueError, match="2 heads for 1 groups"):
        plan_prefix([1, 2], [[5, 6]], 32)
