"""Property tests of the shard math: equal step counts, at most (or exactly) once per epoch, exact resume.

Every property test is deterministic (``derandomize``: the same examples on
every run) and bounded (``max_examples``, no per-example deadline that a
loaded machine could miss); examples that do not fit are rejected with
``assume``, so they are not counted as passes."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import assume, given, settings, strategies as st

from rankwarden.data import ResumableSampler, ShardedRecords, epoch_permutation, rank_shards

datasets = st.lists(st.integers(1, 12), min_size=1, max_size=10)  # records per shard
bounded = settings(max_examples=150, derandomize=True, deadline=None)


def make_records(sizes, rank, world, seed, **kwargs):
    shards = [[(s, i) for i in range(n)] for s, n in enumerate(sizes)]
    return ShardedRecords(len(sizes), lambda s: shards[s], rank=rank, world_size=world, seed=seed, **kwargs)


def epoch_of(records) -> list:
    """One epoch of a rank's records (stop when the epoch counter moves on)."""
    out = []
    start_epoch = records.epoch
    while True:
        state = records.state_dict()
        item = next(records)
        if records.epoch != start_epoch:
            records.load_state_dict(state)  # put the record back
            return out
        out.append(item)


def epochs_by_rank(sizes, world, seed, epoch, **kwargs) -> list[list]:
    out = []
    for rank in range(world):
        records = make_records(sizes, rank, world, seed, **kwargs)
        records.load_state_dict({"epoch": epoch, "shard": 0, "record": 0, "seed": seed, "world_size": world})
        out.append(epoch_of(records))
    return out


@given(datasets, st.integers(1, 4), st.integers(0, 2**32), st.integers(0, 3))
@bounded
def test_every_rank_reads_the_same_number_of_records_each_epoch(sizes, world, seed, epoch):
    assume(len(sizes) >= world)
    per_rank = epochs_by_rank(sizes, world, seed, epoch)
    # Equal step counts (DDP would hang otherwise), and as many as the smallest share allows.
    lengths = {len(mine) for mine in per_rank}
    assert len(lengths) == 1
    shares = [sum(sizes[s] for s in rank_shards(len(sizes), r, world, seed, epoch)) for r in range(world)]
    assert lengths == {min(shares)}
    # No record twice in an epoch; every record read is a real one.
    seen = [item for mine in per_rank for item in mine]
    assert len(seen) == len(set(seen))
    assert set(seen) <= {(s, i) for s, n in enumerate(sizes) for i in range(n)}


@given(st.integers(1, 12), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**32), st.integers(0, 3))
@bounded
def test_equal_shards_are_read_exactly_once_in_the_uncut_order(size, world, per_rank_shards, seed, epoch):
    # The demo's data (equal shards, a multiple of the world size): nothing is
    # dropped and the order is the plain shard math, as before the cut existed,
    # so its bit-identical resume claim is unchanged.
    sizes = [size] * (world * per_rank_shards)
    per_rank = epochs_by_rank(sizes, world, seed, epoch)
    for rank, mine in enumerate(per_rank):
        expected = [(s, i) for s in rank_shards(len(sizes), rank, world, seed, epoch)
                    for i in epoch_permutation(size, seed, epoch, s)]
        assert mine == expected
    assert sorted(item for mine in per_rank for item in mine) == [(s, i) for s in range(len(sizes)) for i in range(size)]


def test_unequal_shards_give_equal_step_counts():
    # The case from issue 13: shards of 1 and 12 records used to give 1 vs 12.
    per_rank = epochs_by_rank([1, 12], 2, seed=0, epoch=0)
    assert [len(mine) for mine in per_rank] == [1, 1]
    # Given sizes agree with counting; a shard that disagrees is refused.
    assert epochs_by_rank([1, 12], 2, seed=0, epoch=0, shard_sizes=[1, 12]) == per_rank
    with pytest.raises(ValueError, match="shard 1 has 12 records, but shard_sizes says 11"):
        epochs_by_rank([1, 12], 2, seed=0, epoch=1, shard_sizes=[1, 11])


@given(datasets, st.integers(1, 3), st.integers(0, 2**32), st.integers(0, 60), st.integers(1, 60))
@settings(bounded, max_examples=200)
def test_stopping_anywhere_and_resuming_yields_exactly_the_remaining_sequence(sizes, world, seed, stop_at, more):
    assume(len(sizes) >= world)
    rank = seed % world
    reference = list(itertools.islice(make_records(sizes, rank, world, seed), stop_at + more))
    first = make_records(sizes, rank, world, seed)
    head = list(itertools.islice(first, stop_at))
    saved = first.state_dict()
    resumed = make_records(sizes, rank, world, seed)  # a fresh process
    resumed.load_state_dict(saved)
    assert head + list(itertools.islice(resumed, more)) == reference


@given(st.integers(0, 200), st.integers(1, 5), st.integers(0, 2**32), st.integers(0, 5))
@bounded
def test_sampler_covers_each_epoch_once_with_equal_lengths(size, world, seed, epoch):
    seen = []
    lengths = set()
    for rank in range(world):
        sampler = ResumableSampler(size, rank=rank, world_size=world, seed=seed)
        sampler.set_epoch(epoch)
        mine = list(sampler)
        lengths.add(len(mine))
        seen += mine
    assert len(lengths) == 1  # equal steps on every rank (DDP would hang otherwise)
    assert len(seen) == len(set(seen)) == (size // world) * world


@given(st.integers(1, 200), st.integers(1, 4), st.integers(0, 2**32), st.data())
@bounded
def test_sampler_resumes_exactly_mid_epoch(size, world, seed, data):
    rank = data.draw(st.integers(0, world - 1))
    sampler = ResumableSampler(size, rank=rank, world_size=world, seed=seed)
    sampler.set_epoch(2)
    full = sampler.indices()
    stop = data.draw(st.integers(0, len(full)))
    it = iter(sampler)
    head = [next(it) for _ in range(stop)]
    restored = ResumableSampler(size, rank=rank, world_size=world, seed=seed)
    restored.load_state_dict(sampler.state_dict())
    assert head + list(restored) == full


def test_order_depends_only_on_the_seed():
    assert epoch_permutation(10, 7, 1) == epoch_permutation(10, 7, 1)
    assert epoch_permutation(10, 7, 1) != epoch_permutation(10, 7, 2)
    assert rank_shards(8, 1, 2, seed=3, epoch=0) == epoch_permutation(8, 3, 0)[1::2]


def test_resuming_with_another_seed_or_world_size_is_refused():
    records = make_records([3, 3], 0, 2, seed=1)
    with pytest.raises(ValueError, match="resuming would change the data order"):
        records.load_state_dict({"epoch": 0, "shard": 0, "record": 1, "seed": 2, "world_size": 2})
    with pytest.raises(ValueError, match="cannot feed 3 ranks"):
        make_records([3, 3], 0, 3, seed=1)
