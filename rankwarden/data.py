"""Deterministic data sharding with exact resume.

Shard math (why it is this way): every epoch the list of shards is permuted
with a generator seeded by (seed, epoch), and rank ``r`` of ``W`` takes
positions ``r, r+W, r+2W, ...`` of that permutation; within a shard the
records are permuted with a generator seeded by (seed, epoch, shard). So each
epoch every record is read at most once across the ranks, the order depends
on nothing but the seed (not on timing, restarts or the number of attempts),
and a position (epoch, shard, record) names exactly where a rank stands. That
position goes into every checkpoint; a rank restored from it continues with
exactly the next record, which is what makes a killed-and-resumed run end
bit-identical to one that never stopped.

Equal step counts (drop). Under DDP every rank must take the same number of
steps per epoch, or the rank with more records waits forever in a collective
at the end of the epoch. Shards may differ in size, and their number need not
divide by the world size, so the ranks' shares differ. Every rank therefore
reads the same number of records per epoch: the smallest share any rank has
that epoch (``epoch_length``). A rank with a larger share stops there and the
rest of its share is skipped for that epoch (like ``DistributedSampler``'s
``drop_last``); since shard assignment and record order are permuted anew each
epoch, a different part is skipped each time. With equal-sized shards whose
number divides by the world size nothing is skipped and the order is what it
would be without the cut. Computing the shares needs every shard's size:
pass ``shard_sizes``, or each shard is loaded once to count it.

``ShardedRecords`` iterates over records in shard files; ``ResumableSampler``
has the same contract for map-style datasets (the DistributedSampler use
case). Neither imports torch.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator, Sequence

__all__ = ["ResumableSampler", "ShardedRecords", "epoch_permutation", "rank_shards"]


def epoch_permutation(n: int, seed: int, *salt: int) -> list[int]:
    """A permutation of ``range(n)`` that depends only on (seed, *salt)."""
    order = list(range(n))
    random.Random(_mix(seed, *salt)).shuffle(order)
    return order


def _mix(*values: int) -> int:
    # A stable integer from several: random.Random(tuple) would hash, and str
    # hashing is salted per process; this is the same in every process.
    mixed = 0x9E3779B97F4A7C15
    for value in values:
        mixed = (mixed * 0x100000001B3 ^ (value & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
    return mixed


def rank_shards(num_shards: int, rank: int, world_size: int, seed: int, epoch: int) -> list[int]:
    """The shards rank ``rank`` reads in ``epoch``, in order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    return epoch_permutation(num_shards, seed, epoch)[rank::world_size]


class ShardedRecords:
    """Iterates this rank's records of a dataset stored as shard files, resumably.

    ``load(shard_index)`` returns the records of one shard (a sequence);
    ``num_shards`` is how many there are; ``shard_sizes`` (optional) how many
    records each holds. Iteration is endless across epochs; every rank reads
    ``epoch_length(epoch)`` records per epoch (see the module docstring);
    ``state_dict`` is where the next record comes from.
    """

    def __init__(
        self,
        num_shards: int,
        load: Callable[[int], Sequence[Any]],
        *,
        rank: int,
        world_size: int,
        seed: int = 0,
        shard_sizes: Sequence[int] | None = None,
    ) -> None:
        if num_shards < world_size:
            raise ValueError(f"{num_shards} shards cannot feed {world_size} ranks: every rank needs at least one")
        self.num_shards = num_shards
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self._load = load
        self.epoch = 0
        self.shard = 0  # index into this rank's shard list for the epoch
        self.record = 0  # index into the shard's permuted record order
        self._cache: tuple[int, Sequence[Any], list[int]] | None = None
        self._cache_epoch = -1
        if shard_sizes is not None and len(shard_sizes) != num_shards:
            raise ValueError(f"shard_sizes has {len(shard_sizes)} entries for {num_shards} shards")
        self._sizes: list[int] | None = None if shard_sizes is None else [int(n) for n in shard_sizes]
        self._lengths: dict[int, int] = {}

    def shard_sizes(self) -> list[int]:
        """Records per shard (counted by loading each shard once, if not given)."""
        if self._sizes is None:
            self._sizes = [len(self._load(i)) for i in range(self.num_shards)]
        return self._sizes

    def epoch_length(self, epoch: int | None = None) -> int:
        """Records every rank reads in ``epoch``: the smallest rank's share (the rest is dropped)."""
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._lengths:
            sizes = self.shard_sizes()
            self._lengths = {epoch: min(
                sum(sizes[s] for s in rank_shards(self.num_shards, r, self.world_size, self.seed, epoch))
                for r in range(self.world_size)
            )}
        return self._lengths[epoch]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "shard": self.shard, "record": self.record, "seed": self.seed,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed or state.get("world_size", self.world_size) != self.world_size:
            raise ValueError(
                f"data position was saved with seed {state.get('seed')} and world size {state.get('world_size')}; "
                f"this run has seed {self.seed} and world size {self.world_size}: resuming would change the data order"
            )
        self.epoch, self.shard, self.record = int(state["epoch"]), int(state["shard"]), int(state["record"])

    def _shard_records(self, shard_id: int) -> tuple[Sequence[Any], list[int]]:
        if self._cache is None or self._cache[0] != shard_id or self._cache_epoch != self.epoch:
            records = self._load(shard_id)
            if self._sizes is not None and len(records) != self._sizes[shard_id]:
                raise ValueError(
                    f"shard {shard_id} has {len(records)} records, but shard_sizes says {self._sizes[shard_id]}: "
                    "the ranks' step counts would differ"
                )
            order = epoch_permutation(len(records), self.seed, self.epoch, shard_id)
            self._cache = (shard_id, records, order)
            self._cache_epoch = self.epoch
        return self._cache[1], self._cache[2]

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        while True:
            shards = rank_shards(self.num_shards, self.rank, self.world_size, self.seed, self.epoch)
            sizes = self.shard_sizes()
            # Records read so far this epoch, from the position alone (so a
            # restored position needs nothing more); at the epoch's length, stop.
            taken = sum(sizes[s] for s in shards[: self.shard]) + self.record
            if self.shard >= len(shards) or taken >= self.epoch_length():
                self.epoch, self.shard, self.record = self.epoch + 1, 0, 0
                continue
            records, order = self._shard_records(shards[self.shard])
            if self.record >= len(order):
                self.shard, self.record = self.shard + 1, 0
                continue
            item = records[order[self.record]]
            self.record += 1
            return item


class ResumableSampler:
    """Indices of a map-style dataset for one rank, per epoch, resumable mid-epoch.

    Like ``DistributedSampler(shuffle=True, drop_last=True)``: each epoch the
    indices are permuted by (seed, epoch), cut to a multiple of the world size
    (so every rank takes the same number of steps), and rank ``r`` takes
    ``r, r+W, ...``. ``state_dict`` records (epoch, next index); iterating a
    restored sampler yields exactly the rest of the epoch.
    """

    def __init__(self, dataset_size: int, *, rank: int, world_size: int, seed: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.size, self.rank, self.world_size, self.seed = dataset_size, rank, world_size, seed
        self.epoch = 0
        self.index = 0

    def __len__(self) -> int:
        return self.size // self.world_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.index = epoch, 0

    def indices(self) -> list[int]:
        order = epoch_permutation(self.size, self.seed, self.epoch)
        return order[: len(self) * self.world_size][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        mine = self.indices()
        while self.index < len(mine):
            value = mine[self.index]
            self.index += 1
            yield value

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed or state.get("world_size", self.world_size) != self.world_size:
            raise ValueError("sampler state was saved with another seed or world size")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
