"""Property tests of the shard math: exactly once per epoch, exact resume from any position."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings, strategies as st

from rankwarden.data import ResumableSampler, ShardedRecords, epoch_permutation, rank_shards

datasets = st.lists(st.integers(1, 12), min_size=1, max_size=10)  # records per shard


def make_records(sizes, rank, world, seed):
    shards = [[(s, i) for i in range(n)] for s, n in enumerate(sizes)]
    return ShardedRecords(len(sizes), lambda s: shards[s], rank=rank, world_size=world, seed=seed)


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


@given(datasets, st.integers(1, 4), st.integers(0, 2**32), st.integers(0, 3))
def test_every_record_is_seen_exactly_once_per_epoch_across_ranks(sizes, world, seed, epoch):
    if len(sizes) < world:
        return
    seen = []
    for rank in range(world):
        records = make_records(sizes, rank, world, seed)
        records.load_state_dict({"epoch": epoch, "shard": 0, "record": 0, "seed": seed, "world_size": world})
        seen += epoch_of(records)
    assert sorted(seen) == sorted((s, i) for s, n in enumerate(sizes) for i in range(n))


@given(datasets, st.integers(1, 3), st.integers(0, 2**32), st.integers(0, 60), st.integers(1, 60))
@settings(max_examples=200)
def test_stopping_anywhere_and_resuming_yields_exactly_the_remaining_sequence(sizes, world, seed, stop_at, more):
    if len(sizes) < world:
        return
    rank = seed % world
    reference = list(itertools.islice(make_records(sizes, rank, world, seed), stop_at + more))
    first = make_records(sizes, rank, world, seed)
    head = list(itertools.islice(first, stop_at))
    saved = first.state_dict()
    resumed = make_records(sizes, rank, world, seed)  # a fresh process
    resumed.load_state_dict(saved)
    assert head + list(itertools.islice(resumed, more)) == reference


@given(st.integers(0, 200), st.integers(1, 5), st.integers(0, 2**32), st.integers(0, 5))
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
