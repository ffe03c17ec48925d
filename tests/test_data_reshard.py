"""Data positions redistributed to another world size: the rest of the epoch is read exactly once.

Deterministic (``derandomize``) and bounded like ``test_data_shards``. The
old ranks read in lockstep (as DDP ranks do), a checkpoint takes every old
rank's position, and a new world of another size continues from the list."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings, strategies as st

from rankwarden.data import ResumableSampler, ShardedRecords

from .test_data_shards import epoch_of, make_records

datasets = st.lists(st.integers(1, 10), min_size=1, max_size=10)
bounded = settings(max_examples=120, derandomize=True, deadline=None)


def read_lockstep(ranks, count):
    """Each rank reads ``count`` records (or until its epoch ends); what they read."""
    epoch = ranks[0].epoch
    out = []
    for _ in range(count):
        for r in ranks:
            state = r.state_dict()
            item = next(r)
            if r.epoch != epoch:
                r.load_state_dict(state)
                return out
            out.append(item)
    return out


def check_rest_of_epoch(before, after_ranks, new_world):
    """``after_ranks`` (new world) finish the epoch; with what ``before`` read, each record at most once,
    equal counts per new rank, and at most ``new_world - 1`` records of the epoch left unread."""
    rest = [epoch_of(r) for r in after_ranks]
    assert len({len(mine) for mine in rest}) == 1
    seen = before + [item for mine in rest for item in mine]
    assert len(seen) == len(set(seen))
    return seen, rest


@given(datasets, st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**32), st.integers(0, 2), st.floats(0, 1))
@bounded
def test_sharded_records_resharded_mid_epoch_reads_the_rest_exactly_once(sizes, old, new, seed, epoch, fraction):
    assume(len(sizes) >= max(old, new))
    full = [item for mine in _epoch(sizes, old, seed, epoch) for item in mine]  # what the old world reads this epoch
    ranks = [make_records(sizes, r, old, seed) for r in range(old)]
    for r in ranks:
        r.load_state_dict({"epoch": epoch, "shard": 0, "record": 0, "seed": seed, "world_size": old})
    before = read_lockstep(ranks, int(fraction * len(full) / old))
    states = [r.state_dict() for r in ranks]
    after = [make_records(sizes, r, new, seed) for r in range(new)]
    for r in after:
        r.load_state_dict(states)
    if after[0].epoch != epoch:  # nothing was left that every new rank could read as often
        assert len(full) - len(before) < new
        return
    seen, _ = check_rest_of_epoch(before, after, new)
    assert set(seen) <= set(full)
    assert len(full) - len(seen) < new  # the rest is read exactly once, but for < new dropped for equal steps
    # The epoch after is the new world's ordinary layout.
    for r in after:
        next(r)
        assert r.epoch == epoch + 1 and not r.reshard


@given(datasets, st.lists(st.integers(1, 4), min_size=2, max_size=4), st.integers(0, 2**32), st.floats(0, 0.5))
@bounded
def test_sharded_records_resharded_twice_in_one_epoch(sizes, worlds, seed, fraction):
    assume(len(sizes) >= max(worlds))
    full = {item for mine in _epoch(sizes, worlds[0], seed, 0) for item in mine}
    ranks = [make_records(sizes, r, worlds[0], seed) for r in range(worlds[0])]
    seen = []
    for world in worlds[1:]:
        seen += read_lockstep(ranks, int(fraction * len(full) / len(ranks)))
        states = [r.state_dict() for r in ranks]
        ranks = [make_records(sizes, r, world, seed) for r in range(world)]
        for r in ranks:
            r.load_state_dict(states)
        if ranks[0].epoch != 0:
            break
    else:
        rest = [epoch_of(r) for r in ranks]
        assert len({len(mine) for mine in rest}) == 1
        seen += [item for mine in rest for item in mine]
    assert len(seen) == len(set(seen)) and set(seen) <= full
    assert len(full) - len(seen) < sum(worlds[1:])  # each change drops fewer than its new world size


@given(st.integers(1, 60), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**32), st.floats(0, 1))
@bounded
def test_resumable_sampler_resharded_mid_epoch_reads_the_rest_exactly_once(size, old, new, seed, fraction):
    samplers = [ResumableSampler(size, rank=r, world_size=old, seed=seed) for r in range(old)]
    full = [i for s in samplers for i in s.indices()]
    taken = int(fraction * (size // old))
    before = []
    for s in samplers:
        it = iter(s)
        before += [next(it) for _ in range(taken)]
    states = [s.state_dict() for s in samplers]
    after = [ResumableSampler(size, rank=r, world_size=new, seed=seed) for r in range(new)]
    for s in after:
        s.load_state_dict(states)
    if after[0].epoch != 0:  # nothing was left that every new rank could read as often
        assert len(full) - len(before) < new
        return
    rest = [list(s) for s in after]
    assert len({len(mine) for mine in rest}) == 1
    seen = before + [i for mine in rest for i in mine]
    assert len(seen) == len(set(seen)) and set(seen) <= set(full)
    assert len(full) - len(seen) < new
    # Saved and restored mid-way at the new size, too: the same sequence.
    again = ResumableSampler(size, rank=0, world_size=new, seed=seed)
    again.load_state_dict(states)
    it = iter(again)
    head = [next(it) for _ in range(min(2, len(rest[0])))]
    restored = ResumableSampler(size, rank=0, world_size=new, seed=seed)
    restored.load_state_dict(again.state_dict())
    assert head + list(restored) == rest[0]


def test_4_to_2_mid_epoch_concrete():
    sizes = [3] * 8
    ranks = [make_records(sizes, r, 4, 7) for r in range(4)]
    before = read_lockstep(ranks, 2)
    after = [make_records(sizes, r, 2, 7) for r in range(2)]
    for r in after:
        r.load_state_dict([r0.state_dict() for r0 in ranks])
    seen, rest = check_rest_of_epoch(before, after, 2)
    assert len(seen) == 24 and [len(mine) for mine in rest] == [8, 8]


def test_a_saved_resharded_position_continues_exactly():
    sizes = [4] * 6
    old = [make_records(sizes, r, 3, 1) for r in range(3)]
    read_lockstep(old, 3)
    new = make_records(sizes, 1, 2, 1)
    new.load_state_dict([r.state_dict() for r in old])
    expected = epoch_of(new)
    new2 = make_records(sizes, 1, 2, 1)
    new2.load_state_dict([r.state_dict() for r in old])
    first = [next(new2) for _ in range(2)]
    saved = new2.state_dict()
    again = make_records(sizes, 1, 2, 1)
    again.load_state_dict(saved)
    assert first + epoch_of(again) == expected


def test_positions_from_different_steps_are_refused():
    sizes = [2] * 4
    a, b = make_records(sizes, 0, 2, 0), make_records(sizes, 1, 2, 0)
    next(a)
    states = [a.state_dict(), b.state_dict()]
    states[1]["epoch"] = 3
    with pytest.raises(ValueError, match="different places"):
        make_records(sizes, 0, 1, 0).load_state_dict(states)


def _epoch(sizes, world, seed, epoch):
    from .test_data_shards import epochs_by_rank

    return epochs_by_rank(sizes, world, seed, epoch)
