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

Resharding (resume at another world size). A checkpoint of sharded state
can be resumed by another number of ranks (``rankwarden.checkpoint``, layout
"dcp"); the data positions of all the old ranks come with it, and
``load_state_dict(list_of_every_old_rank's_state)`` redistributes them so
that the rest of the epoch is read exactly once. Why it is this way: the
rest of the epoch is what the old ranks had not read yet, concatenated in
rank order (old rank 0's remainder, then 1's, ...); new rank ``r`` of ``W'``
takes positions ``r, r+W', ...`` of that sequence, each rank the same number,
``len // W'`` (equal step counts again: the last ``len % W'`` records, fewer
than ``W'``, are dropped, as at the end of every epoch). The position is then
(epoch, the chain of old takes, index), a few integers per old rank; a
second change of world size in the same epoch adds another link to the
chain. The next epoch starts afresh at the new world size.

``ShardedRecords`` iterates over records in shard files; ``ResumableSampler``
has the same contract for map-style datasets (the DistributedSampler use
case). Neither imports torch.
"""

from __future__ import annotations

import bisect
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


def _chain_lengths(chain: list[list[int]], base_length: int, world_size: int) -> list[int]:
    """Records per rank at each link of a reshard chain (the last: at ``world_size``)."""
    lengths = [base_length]
    for k, takes in enumerate(chain):
        world = len(chain[k + 1]) if k + 1 < len(chain) else world_size
        lengths.append(sum(lengths[k] - t for t in takes) // world)
    return lengths


def _chain_locate(chain: list[list[int]], lengths: list[int], world_size: int, rank: int, index: int) -> tuple[int, int]:
    """(old rank, position) in the base layout of the ``index``-th record of ``rank`` after the chain."""
    world, m = world_size, rank + index * world_size
    for k in range(len(chain) - 1, -1, -1):
        takes = chain[k]
        starts = [0]
        for t in takes:
            starts.append(starts[-1] + lengths[k] - t)
        q = bisect.bisect_right(starts, m) - 1
        j = takes[q] + (m - starts[q])
        if k == 0:
            return q, j
        world = len(takes)
        m = q + j * world
    return rank, index  # no chain: the base layout itself


def _reshard(states: Sequence[dict], kind: str, seed: int, base_length: Callable[[int, int], int],
             taken: Callable[[dict], int], world_size: int) -> tuple[int, list[list[int]]]:
    """(epoch, chain) for the new world from every old rank's position; see the module docstring."""
    if not states:
        raise ValueError(f"no {kind} states to redistribute")
    if any(state.get("seed", seed) != seed for state in states):
        raise ValueError(f"{kind} states were saved with seed {states[0].get('seed')}; this run has seed {seed}")
    old_world = len(states)
    if any(state.get("world_size", old_world) != old_world for state in states):
        raise ValueError(f"{old_world} {kind} states given, but they were saved by world size "
                         f"{sorted({state.get('world_size') for state in states})}: pass every old rank's state")
    positions, takes = set(), []
    for state in states:
        epoch, chain = int(state["epoch"]), [[int(t) for t in link] for link in state.get("reshard", [])]
        lengths = _chain_lengths(chain, base_length(epoch, len(chain[0]) if chain else old_world), old_world)
        done = taken(state)
        if done >= lengths[-1]:  # at the very end of its epoch: the same as the start of the next
            epoch, chain, done = epoch + 1, [], 0
        positions.add((epoch, tuple(map(tuple, chain))))
        takes.append(done)
    if len(positions) != 1:
        raise ValueError(f"the old ranks' {kind} states are at different places of the data "
                         f"({sorted(positions)}): they must come from the same checkpoint step")
    ((epoch, chain),) = positions
    new_chain = [list(link) for link in chain] + [takes]
    lengths = _chain_lengths(new_chain, base_length(epoch, len(new_chain[0])), world_size)
    if lengths[-1] == 0:  # nothing left that every new rank can read as often: next epoch
        return epoch + 1, []
    return epoch, new_chain


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
        self._lengths: dict[tuple[int, int], int] = {}
        #: While an epoch is resharded: every old world's takes (see the module docstring), and
        #: the index of the next record in this rank's part of the rest of the epoch.
        self.reshard: list[list[int]] = []
        self.index = 0

    def shard_sizes(self) -> list[int]:
        """Records per shard (counted by loading each shard once, if not given)."""
        if self._sizes is None:
            self._sizes = [len(self._load(i)) for i in range(self.num_shards)]
        return self._sizes

    def epoch_length(self, epoch: int | None = None) -> int:
        """Records every rank reads in ``epoch``: the smallest rank's share (the rest is dropped)."""
        epoch = self.epoch if epoch is None else epoch
        if self.reshard and epoch == self.epoch:
            return _chain_lengths(self.reshard, self._share(epoch, len(self.reshard[0])), self.world_size)[-1]
        return self._share(epoch, self.world_size)

    def _share(self, epoch: int, world_size: int) -> int:
        """Records every rank of ``world_size`` reads in ``epoch`` (the smallest share)."""
        if world_size > self.num_shards:
            raise ValueError(f"{self.num_shards} shards cannot feed {world_size} ranks")
        if (epoch, world_size) not in self._lengths:
            sizes = self.shard_sizes()
            if len(self._lengths) > 8:
                self._lengths.clear()
            self._lengths[(epoch, world_size)] = min(
                sum(sizes[s] for s in rank_shards(self.num_shards, r, world_size, self.seed, epoch))
                for r in range(world_size)
            )
        return self._lengths[(epoch, world_size)]

    def _taken(self, state: dict) -> int:
        """Records a (saved) rank had read of its epoch's share."""
        if state.get("reshard"):
            return int(state["index"])
        world, rank = int(state["world_size"]), int(state["rank"])
        mine = rank_shards(self.num_shards, rank, world, self.seed, int(state["epoch"]))
        sizes = self.shard_sizes()
        return sum(sizes[s] for s in mine[: int(state["shard"])]) + int(state["record"])

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "shard": self.shard, "record": self.record, "seed": self.seed,
                 "world_size": self.world_size, "rank": self.rank}
        if self.reshard:
            state.update(reshard=[list(link) for link in self.reshard], index=self.index)
        return state

    def load_state_dict(self, state: dict | Sequence[dict]) -> None:
        """Continue from a saved position: this rank's own, or every old rank's (a list, in rank order).

        A list from the same world size is this rank's entry; from another
        world size the rest of the epoch is redistributed (module docstring)."""
        if not isinstance(state, dict):
            states = [dict(s) for s in state]
            if len(states) == self.world_size and all(s.get("world_size") == self.world_size for s in states):
                return self.load_state_dict(states[self.rank])
            for r, s in enumerate(states):
                s.setdefault("rank", r)
            epoch, chain = _reshard(states, "data position", self.seed, self._share, self._taken, self.world_size)
            self.epoch, self.shard, self.record, self.reshard, self.index = epoch, 0, 0, chain, 0
            return
        if state.get("seed", self.seed) != self.seed or state.get("world_size", self.world_size) != self.world_size:
            raise ValueError(
                f"data position was saved with seed {state.get('seed')} and world size {state.get('world_size')}; "
                f"this run has seed {self.seed} and world size {self.world_size}: resuming would change the data order"
            )
        self.epoch, self.shard, self.record = int(state["epoch"]), int(state["shard"]), int(state["record"])
        self.reshard = [[int(t) for t in link] for link in state.get("reshard", [])]
        self.index = int(state.get("index", 0))

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

    def _next_resharded(self) -> tuple[int, int] | None:
        """(shard, position in its order) of the next record of a resharded epoch; None at its end."""
        old_world = len(self.reshard[0])
        lengths = _chain_lengths(self.reshard, self._share(self.epoch, old_world), self.world_size)
        if self.index >= lengths[-1]:
            return None
        q, j = _chain_locate(self.reshard, lengths, self.world_size, self.rank, self.index)
        sizes = self.shard_sizes()
        for shard in rank_shards(self.num_shards, q, old_world, self.seed, self.epoch):
            if j < sizes[shard]:
                return shard, j
            j -= sizes[shard]
        raise AssertionError("a resharded position past its old rank's share")  # pragma: no cover

    def __next__(self) -> Any:
        while self.reshard:
            found = self._next_resharded()
            if found is None:
                self.epoch, self.shard, self.record, self.reshard, self.index = self.epoch + 1, 0, 0, [], 0
                break
            records, order = self._shard_records(found[0])
            self.index += 1
            return records[order[found[1]]]
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
        #: While an epoch is resharded: every old world's takes (see the module docstring).
        self.reshard: list[list[int]] = []

    def __len__(self) -> int:
        return self.size // self.world_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.index, self.reshard = epoch, 0, []

    def indices(self) -> list[int]:
        order = epoch_permutation(self.size, self.seed, self.epoch)
        if self.reshard:
            old_world = len(self.reshard[0])
            lengths = _chain_lengths(self.reshard, self.size // old_world, self.world_size)
            located = (_chain_locate(self.reshard, lengths, self.world_size, self.rank, i) for i in range(lengths[-1]))
            return [order[q + j * old_world] for q, j in located]
        return order[: len(self) * self.world_size][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        mine = self.indices()
        while self.index < len(mine):
            value = mine[self.index]
            self.index += 1
            yield value

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "index": self.index, "seed": self.seed, "world_size": self.world_size}
        if self.reshard:
            state["reshard"] = [list(link) for link in self.reshard]
        return state

    def load_state_dict(self, state: dict | Sequence[dict]) -> None:
        """This rank's saved position, or every old rank's (a list, in rank order) to redistribute."""
        if not isinstance(state, dict):
            states = [dict(s) for s in state]
            if len(states) == self.world_size and all(s.get("world_size") == self.world_size for s in states):
                return self.load_state_dict(states[self.rank])
            epoch, chain = _reshard(states, "sampler", self.seed, lambda epoch, world: self.size // world,
                                    lambda s: int(s["index"]), self.world_size)
            self.epoch, self.index, self.reshard = epoch, 0, chain
            return
        if state.get("seed", self.seed) != self.seed or state.get("world_size", self.world_size) != self.world_size:
            raise ValueError("sampler state was saved with another seed or world size")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.reshard = [[int(t) for t in link] for link in state.get("reshard", [])]
