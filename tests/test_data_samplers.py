"""ResumableDistributedSampler: deterministic shards, epochs, exact resume (even on another dp size)."""

import itertools

import pytest

from megatron.emdr2.data.samplers import ResumableDistributedSampler as S


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def global_batches(num, gbs, dp, mbs, steps, **kw):
    """Interleave the ranks' micro-batches back into global batches."""
    ranks = [iter(S(num, gbs, r, dp, seed=7, micro_batch_size=mbs, **kw)) for r in range(dp)]
    out = []
    for _ in range(steps):
        batch = []
        for _ in range(gbs // (mbs * dp)):
            for it in ranks:
                batch.extend(next(it))
        out.append(batch)
    return out


def test_shards_are_disjoint_and_cover_each_epoch():
    num, gbs, dp = 103, 12, 3
    epoch = global_batches(num, gbs, dp, mbs=2, steps=num // gbs)
    flat = [i for b in epoch for i in b]
    assert len(flat) == len(set(flat)) == (num // gbs) * gbs  # drop_last: 96 distinct samples
    # the same global batches whatever the data-parallel size
    assert epoch == global_batches(num, gbs, 1, mbs=12, steps=num // gbs)
    assert epoch == global_batches(num, gbs, 2, mbs=3, steps=num // gbs)


def test_epochs_reshuffle_deterministically():
    s = S(50, 10, seed=3)
    two_epochs = take(s, 10)
    assert sum(two_epochs[:5], []) != sum(two_epochs[5:], [])
    assert sorted(sum(two_epochs[5:], [])) == list(range(50))
    assert take(S(50, 10, seed=3), 10) == two_epochs
    assert take(S(50, 10, seed=4), 10) != two_epochs
    assert take(S(50, 10, shuffle=False), 2) == [list(range(10)), list(range(10, 20))]


@pytest.mark.parametrize("stop", [1, 4, 7, 13])
def test_resume_yields_exactly_the_uninterrupted_sequence(stop):
    kw = dict(num_samples=37, global_batch_size=8, dp_rank=1, dp_size=2, seed=11, micro_batch_size=2)
    full = take(S(**kw), 40)
    first = S(**kw)
    head = take(first, stop)
    state = first.state_dict()
    assert state["consumed_samples"] == stop * 4 and state["epoch"] == stop * 4 // 32
    resumed = S(**kw)
    resumed.load_state_dict(state)
    assert head + take(resumed, 40 - stop) == full


def test_resume_on_a_different_dp_size():
    before = global_batches(40, 8, 2, mbs=2, steps=6)
    rank_samplers = [S(40, 8, r, 2, seed=7, micro_batch_size=2) for r in range(2)]
    its = [iter(s) for s in rank_samplers]
    for _ in range(2 * 2):  # two global batches: 2 micro-steps each, on both ranks
        for it in its:
            next(it)
    state = rank_samplers[0].state_dict()
    assert state["consumed_samples"] == 16
    after = []
    four = [S(40, 8, r, 4, seed=7, micro_batch_size=1) for r in range(4)]
    for s in four:
        s.load_state_dict(state)
    its = [iter(s) for s in four]
    for _ in range(4):
        batch = []
        for _ in range(2):
            for it in its:
                batch.extend(next(it))
        after.append(batch)
    assert after == before[2:]


def test_epoch_limit_len_and_partial_last_batch():
    s = S(10, 4, dp_rank=0, dp_size=2, shuffle=False, drop_last=False, num_epochs=1)
    got = list(s)
    assert got == [[0, 1], [4, 5], [8]] and len(s) == 3
    other = list(S(10, 4, dp_rank=1, dp_size=2, shuffle=False, drop_last=False, num_epochs=1))
    assert sorted(sum(got + other, [])) == list(range(10))
    assert len(S(10, 4, dp_rank=0, dp_size=2)) == 2  # drop_last: 8 samples, micro-batches of 2


def test_state_checks_and_bad_arguments():
    s = S(40, 8, seed=1)
    with pytest.raises(ValueError, match="seed"):
        s.load_state_dict({**s.state_dict(), "seed": 2})
    with pytest.raises(ValueError, match="multiple"):
        S(40, 10, dp_size=4)
    with pytest.raises(ValueError, match="dp_rank"):
        S(40, 8, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="cannot fill"):
        S(5, 8)
    assert s.state_dict(consumed_samples=24)["consumed_samples"] == 24
